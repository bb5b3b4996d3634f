#!/usr/bin/env node
// Validates the Argo CD and cert-manager objects in YAML streams.
//
//   node tests/k8s/validate-crs.cjs FILE...
//
// Two checks per object, because each misses what the other catches:
//  1. the @kubernetes-models validators (JSON Schema from the projects'
//     CRDs): wrong types, missing required fields, bad enums;
//  2. TypeScript's excess-property check against the same models' typings:
//     misspelt or unknown fields, which the schemas above accept silently
//     (their objects do not forbid additional properties, while the API
//     server with strict field validation - kubectl's default - rejects them).
// Other kinds are ignored (core kinds go to kubernetes-validate, EdgePipelines
// to the fleet crate's validator). Exits 1 on any problem, 2 on bad usage.
"use strict";

const fs = require("fs");
const path = require("path");
const yaml = require("js-yaml");
const ts = require("typescript");
const argo = require("@kubernetes-models/argo-cd/argoproj.io/v1alpha1");
const certManager = require("@kubernetes-models/cert-manager/cert-manager.io/v1");

// apiVersion/kind -> [model class, module and interface for the typings].
const KINDS = {
  "argoproj.io/v1alpha1/Application": [argo.Application, "@kubernetes-models/argo-cd/argoproj.io/v1alpha1", "IApplication"],
  "argoproj.io/v1alpha1/ApplicationSet": [argo.ApplicationSet, "@kubernetes-models/argo-cd/argoproj.io/v1alpha1", "IApplicationSet"],
  "argoproj.io/v1alpha1/AppProject": [argo.AppProject, "@kubernetes-models/argo-cd/argoproj.io/v1alpha1", "IAppProject"],
  "cert-manager.io/v1/Issuer": [certManager.Issuer, "@kubernetes-models/cert-manager/cert-manager.io/v1", "IIssuer"],
  "cert-manager.io/v1/ClusterIssuer": [certManager.ClusterIssuer, "@kubernetes-models/cert-manager/cert-manager.io/v1", "IClusterIssuer"],
  "cert-manager.io/v1/Certificate": [certManager.Certificate, "@kubernetes-models/cert-manager/cert-manager.io/v1", "ICertificate"],
};
// Any other object of these groups is an error: we would not check it.
const GROUPS = ["argoproj.io", "cert-manager.io"];

function main(files) {
  if (files.length === 0) {
    console.error("usage: validate-crs.cjs FILE...");
    process.exit(2);
  }
  const problems = [];
  const checked = [];
  for (const file of files) {
    let docs;
    try {
      docs = yaml.loadAll(fs.readFileSync(file, "utf8"));
    } catch (e) {
      problems.push(`${file}: not YAML: ${e.message}`);
      continue;
    }
    docs.forEach((doc, index) => {
      if (!doc || typeof doc !== "object") return;
      const key = `${doc.apiVersion}/${doc.kind}`;
      const where = `${file} [${index}] ${doc.kind} ${(doc.metadata && doc.metadata.name) || "?"}`;
      const entry = KINDS[key];
      if (!entry) {
        const group = String(doc.apiVersion || "").split("/")[0];
        if (GROUPS.includes(group)) problems.push(`${where}: no validator for ${key}`);
        return;
      }
      try {
        new entry[0](doc).validate();
      } catch (e) {
        problems.push(`${where}: ${e.message}`);
      }
      checked.push({ where, doc, module: entry[1], type: entry[2] });
    });
  }
  problems.push(...typeCheck(checked));
  for (const p of problems) console.error(`INVALID ${p}`);
  console.log(`validate-crs: ${checked.length} object(s) checked, ${problems.length} problem(s)`);
  process.exit(problems.length === 0 ? 0 : 1);
}

// Writes every object as a typed constant and lets the compiler find
// excess properties; diagnostics are mapped back to the object by line.
function typeCheck(checked) {
  if (checked.length === 0) return [];
  const dir = fs.mkdtempSync(path.join(__dirname, ".typecheck-"));
  try {
    const file = path.join(dir, "objects.ts");
    const starts = [];
    const imports = new Map();
    checked.forEach(({ module, type }) => {
      if (!imports.has(module)) imports.set(module, new Set());
      imports.get(module).add(type);
    });
    let text = "";
    for (const [module, types] of imports) {
      text += `import type { ${[...types].join(", ")} } from "${module}";\n`;
    }
    checked.forEach(({ doc, type }, i) => {
      starts.push(text.split("\n").length);
      text += `export const object${i}: ${type} = ${JSON.stringify(doc, null, 2)};\n`;
    });
    fs.writeFileSync(file, text);
    const program = ts.createProgram([file], {
      noEmit: true,
      strict: true,
      skipLibCheck: true,
      module: ts.ModuleKind.ESNext,
      moduleResolution: ts.ModuleResolutionKind.Bundler,
      target: ts.ScriptTarget.ES2020,
      typeRoots: [],
      types: [],
    });
    const problems = [];
    for (const d of ts.getPreEmitDiagnostics(program)) {
      const message = ts.flattenDiagnosticMessageText(d.messageText, "\n");
      if (!d.file || path.resolve(d.file.fileName) !== path.resolve(file)) {
        problems.push(`typings: ${message}`);
        continue;
      }
      const line = d.file.getLineAndCharacterOfPosition(d.start).line + 1;
      let which = 0;
      starts.forEach((start, i) => {
        if (start <= line) which = i;
      });
      const lineText = text.split("\n")[line - 1].trim();
      problems.push(`${checked[which].where}: ${message} (at ${lineText})`);
    }
    return problems;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main(process.argv.slice(2));
