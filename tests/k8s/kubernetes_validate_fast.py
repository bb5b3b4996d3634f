"""kubernetes-validate's command line, made fast enough for 200 sites.

The stock CLI parses YAML with PyYAML's pure-Python loader and re-reads the
large _definitions.json schema for every object: most of a minute of CPU
for the scaffolded sites. This runs the same CLI (same arguments, checks and
messages) with libyaml's loader and each schema file read once; schemas are
only read, so sharing them changes nothing else.

    python kubernetes_validate_fast.py [kubernetes-validate arguments]
"""

import functools
import sys

import yaml
import kubernetes_validate.utils as utils
from kubernetes_validate.__main__ import main


class _Yaml:
    """The yaml module as kubernetes_validate sees it, with the C loader."""

    SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    def __getattr__(self, name):
        return getattr(yaml, name)


utils.yaml = _Yaml()
utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)

if __name__ == "__main__":
    sys.exit(main())
