/*
 * Debian builds LLVM libunwind (libunwind-16-dev) for glibc with
 * _FORTIFY_SOURCE, so libunwind.a calls glibc's checked __fprintf_chk on its
 * error/abort paths. musl has no *_chk functions; this forwards the one call
 * libunwind needs to plain vfprintf. Linked only into the static musl builds
 * (cross/linker/musl-link).
 */
#include <stdarg.h>
#include <stdio.h>

int __fprintf_chk(FILE *stream, int flag, const char *format, ...);

int __fprintf_chk(FILE *stream, int flag, const char *format, ...)
{
    va_list ap;
    int n;

    (void)flag; /* the fortify level: nothing to check without glibc */
    va_start(ap, format);
    n = vfprintf(stream, format, ap);
    va_end(ap);
    return n;
}
