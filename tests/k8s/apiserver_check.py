"""Puts the EdgePipeline CRD and every site's EdgePipeline through a real
API server (scripts/k8s-apiserver.sh check runs this).

It talks REST directly: kubectl's discovery wants the core API (/api), which
apiextensions-apiserver does not serve.

    python apiserver_check.py SERVER_URL PKI_DIR REPO_ROOT

Exit status 0 only if the server accepts the CRD and every site's pipeline,
refuses a broken one, and takes a status patch without bumping the generation.
"""

import glob
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

import yaml


class Api:
    def __init__(self, server, pki):
        self.server = server
        self.context = ssl.create_default_context(cafile=os.path.join(pki, "ca.crt"))
        self.context.load_cert_chain(os.path.join(pki, "admin.crt"), os.path.join(pki, "admin.key"))

    def call(self, method, path, body=None, content_type="application/json"):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Content-Type", content_type)
        request.add_header("Accept", "application/json")
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")


def load(path):
    with open(path) as f:
        return next(d for d in yaml.safe_load_all(f) if d)


def main(server, pki, root):
    api = Api(server, pki)
    failures = []

    crd = load(os.path.join(root, "deploy/k3s/crd/edgepipelines.edgefleet.io.yaml"))
    crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    status, body = api.call("GET", f"{crds}/{crd['metadata']['name']}")
    if status == 200:
        crd["metadata"]["resourceVersion"] = body["metadata"]["resourceVersion"]
        status, body = api.call("PUT", f"{crds}/{crd['metadata']['name']}?fieldValidation=Strict", crd)
    else:
        status, body = api.call("POST", f"{crds}?fieldValidation=Strict", crd)
    if status not in (200, 201):
        sys.exit(f"the CRD was refused ({status}): {body.get('message', body)}")
    for _ in range(60):
        _, body = api.call("GET", f"{crds}/{crd['metadata']['name']}")
        conditions = {c["type"]: c for c in (body.get("status") or {}).get("conditions") or []}
        if conditions.get("NonStructuralSchema", {}).get("status") == "True":
            sys.exit(f"the CRD schema is not structural: {conditions['NonStructuralSchema']['message']}")
        if conditions.get("Established", {}).get("status") == "True":
            break
        time.sleep(0.5)
    else:
        sys.exit(f"the CRD did not become Established: {conditions}")
    print("    CRD accepted and Established")

    base = "/apis/edgefleet.io/v1alpha1/namespaces"
    for path in sorted(glob.glob(os.path.join(root, "gitops/sites/*/edgepipeline.yaml"))):
        site = os.path.basename(os.path.dirname(path))
        pipeline = load(path)
        # One namespace per site: every site's pipeline has the same name.
        namespace = f"site-{site}"
        pipeline["metadata"]["namespace"] = namespace
        name = pipeline["metadata"]["name"]
        api.call("DELETE", f"{base}/{namespace}/edgepipelines/{name}")
        status, body = api.call("POST", f"{base}/{namespace}/edgepipelines?fieldValidation=Strict", pipeline)
        if status != 201:
            failures.append(f"site {site} refused ({status}): {body.get('message', body)}")
        else:
            print(f"    {site}: accepted")

    def refused(label, change):
        pipeline = load(os.path.join(root, "gitops/sites/plant-berlin/edgepipeline.yaml"))
        pipeline["metadata"]["namespace"] = "bad"
        change(pipeline["spec"])
        status, body = api.call("POST", f"{base}/bad/edgepipelines?fieldValidation=Strict", pipeline)
        if status == 201:
            api.call("DELETE", f"{base}/bad/edgepipelines/{pipeline['metadata']['name']}")
            failures.append(f"{label}: accepted, should have been refused")
        else:
            print(f"    {label}: refused ({status}): {body.get('message', '')[:160]}")

    def accepted(label, change):
        pipeline = load(os.path.join(root, "gitops/sites/plant-berlin/edgepipeline.yaml"))
        pipeline["metadata"]["namespace"] = "good"
        change(pipeline["spec"])
        api.call("DELETE", f"{base}/good/edgepipelines/{pipeline['metadata']['name']}")
        status, body = api.call("POST", f"{base}/good/edgepipelines?fieldValidation=Strict", pipeline)
        if status != 201:
            failures.append(f"{label}: refused ({status}): {body.get('message', body)}")
        else:
            print(f"    {label}: accepted")

    # A size's field-level checks apply by type: pattern to strings only,
    # minimum to numbers only.
    accepted("buffer.maxBytes 1048576", lambda s: s["buffer"].update(maxBytes=1048576))
    accepted("buffer.maxBytes '64MiB'", lambda s: s["buffer"].update(maxBytes="64MiB"))
    refused("buffer.maxBytes -1", lambda s: s["buffer"].update(maxBytes=-1))
    refused("buffer.maxBytes '12 parsecs'", lambda s: s["buffer"].update(maxBytes="12 parsecs"))
    refused("buffer.maxBytes true", lambda s: s["buffer"].update(maxBytes=True))
    refused("misspelt uplink.endpont", lambda s: s["uplink"].update(endpont="x"))
    refused("missing uplink", lambda s: s.pop("uplink"))
    refused("whenFull 'sometimes'", lambda s: s["buffer"].update(whenFull="sometimes"))

    namespace = "site-plant-berlin"
    url = f"{base}/{namespace}/edgepipelines/edge-agent"
    status = {
        "status": {
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "AgentsReady",
                            "message": "1 agent(s) ready", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "backlog": {"records": 3, "bytes": 300},
        }
    }
    code, body = api.call("PATCH", f"{url}/status", status, "application/merge-patch+json")
    if code != 200:
        failures.append(f"status patch refused ({code}): {body.get('message', body)}")
    else:
        _, body = api.call("GET", url)
        if body["metadata"].get("generation") != 1 or body.get("status", {}).get("backlog", {}).get("records") != 3:
            failures.append(f"status patch: generation {body['metadata'].get('generation')}, status {body.get('status')}")
        else:
            print("    status patch accepted, generation unchanged")
    # Defaults come from the schema: a minimal spec is filled in by the server.
    minimal = {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgePipeline",
               "metadata": {"name": "minimal", "namespace": "defaults"},
               "spec": {"uplink": {"endpoint": "https://i:7443", "caFile": "a", "certFile": "b", "keyFile": "c"}}}
    api.call("DELETE", f"{base}/defaults/edgepipelines/minimal")
    code, body = api.call("POST", f"{base}/defaults/edgepipelines?fieldValidation=Strict", minimal)
    if code != 201:
        failures.append(f"minimal pipeline refused ({code}): {body.get('message', body)}")
    elif body["spec"].get("buffer", {}).get("maxBytes") != "1GiB":
        failures.append(f"defaults not applied: {body['spec']}")
    else:
        print("    schema defaults applied by the server (buffer.maxBytes 1GiB)")

    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: apiserver_check.py SERVER_URL PKI_DIR REPO_ROOT")
    sys.exit(main(*sys.argv[1:]))
