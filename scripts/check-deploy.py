#!/usr/bin/env python3
"""Checks the deployment files against the code, as far as a machine without a container engine
can: `scripts/check-deploy.py [path/to/fhir-sync]` (default target/debug/fhir-sync).

No container engine runs on the development and CI machines (podman from Debian installs but
cannot start a container there: crun may not set rlimits and refuses the hybrid cgroup layout),
so the image is never built and compose.yaml never run here. What can be checked is that the
files agree with each other and with the binary:

- Dockerfile: the dependency layer creates every target Cargo.toml declares; every COPY source
  exists and is not excluded by .dockerignore; .dockerignore keeps local job files and keys out;
  the HEALTHCHECK probes /healthz on the port the image's ops server listens on and EXPOSEs.
- compose.yaml and deploy/kubernetes/*.yaml parse; every fhir-sync command line in them parses
  with the real binary (`<args> --help` fails on an unknown option or subcommand); mounts,
  volumes, ConfigMaps, dependencies and ports refer to things that exist; the job files they
  mount pass `fhir-sync config check` (with a throwaway key where they name a mounted one); the
  probes name routes the ops server has; the pod runs as the image's user.

Needs PyYAML (`pip install pyyaml`, or Debian's python3-yaml).
"""

import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

try:
    import yaml
except ImportError:
    sys.exit("scripts/check-deploy.py: needs PyYAML: pip install pyyaml (or apt-get install python3-yaml)")

ROOT = Path(__file__).resolve().parent.parent
problems = []


def problem(text):
    if text not in problems:
        problems.append(text)


def cli_parses(exe, args, where):
    """Whether `fhir-sync <args>` is a command line the binary accepts."""
    done = subprocess.run([exe, *args, "--help"], capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or [""])[0]
        problem(f"{where}: `fhir-sync {shlex.join(args)}` does not parse: {first}")


def fhir_sync_invocations(text):
    """The argument lists of every `fhir-sync ...` in a shell command string."""
    for part in re.split(r"&&|\|\||;|\|", text):
        words = shlex.split(part)
        if words and words[0] == "fhir-sync":
            yield words[1:]


def ops_routes():
    routes = set()
    for name in ("http.rs", "api.rs", "page.rs", "metrics.rs"):
        path = ROOT / "src/ops" / name
        if path.exists():
            routes.update(re.findall(r'\.route\(\s*"([^"]+)"', path.read_text()))
    return routes


def check_jobs(exe, jobs, where):
    """`fhir-sync config check` on job files, their mounted key paths pointed at a fresh key."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        key = tmp / "key.pem"
        subprocess.run([exe, "keys", "generate", "--out", str(key)], check=True, capture_output=True)
        (tmp / "jobs").mkdir()
        for name, text in jobs.items():
            text = re.sub(r'(private_key_file\s*=\s*)"[^"]*"', lambda m: f'{m.group(1)}"{key}"', text)
            (tmp / "jobs" / name).write_text(text)
        done = subprocess.run(
            [exe, "--config-dir", str(ROOT / "config"), "--jobs-dir", str(tmp / "jobs"), "config", "check"],
            capture_output=True, text=True, env={**os.environ, "FHIR_SYNC_ENV": "check-deploy"},
        )
        if done.returncode != 0:
            problem(f"{where}: the job files fail config check:\n{done.stdout}{done.stderr}")


def check_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    lines = text.replace("\\\n", " ").splitlines()
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    targets = [cargo["lib"]["path"]] + [t["path"] for key in ("bin", "test") for t in cargo.get(key, [])]
    dummy = next((l for l in lines if "cargo build" in l and "mkdir" in l), "")
    for target in targets:
        if target not in dummy:
            problem(f"Dockerfile: the dependency layer does not create {target}, which Cargo.toml declares")
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    for must in ("/jobs/*.toml", "/keys", "**/*.pem", "/target"):
        if must not in ignored:
            problem(f".dockerignore: does not exclude {must}")
    for line in lines:
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            for source in words[1:-1]:
                if source != "." and not (ROOT / source).exists():
                    problem(f"Dockerfile: COPY {source}: no such file")
                if source.rstrip("/") in ("jobs", "config") and f"/{source.rstrip('/')}" in ignored:
                    problem(f"Dockerfile: COPY {source}, which .dockerignore excludes")
    listen = re.search(r"FHIR_SYNC_OPS__LISTEN=([\d.]+):(\d+)", text)
    health = re.search(r"HEALTHCHECK .*?/dev/tcp/127\.0\.0\.1/(\d+).*?GET (/\S+)", " ".join(lines))
    expose = re.search(r"^EXPOSE (\d+)", text, re.M)
    if not (listen and health and expose):
        problem("Dockerfile: needs ENV FHIR_SYNC_OPS__LISTEN, EXPOSE and a HEALTHCHECK on /dev/tcp")
        return None
    if not listen.group(2) == health.group(1) == expose.group(1):
        problem(f"Dockerfile: listen port {listen.group(2)}, HEALTHCHECK port {health.group(1)} and EXPOSE {expose.group(1)} differ")
    if health.group(2) not in ops_routes():
        problem(f"Dockerfile: HEALTHCHECK requests {health.group(2)}, which the ops server does not route")
    uid = re.search(r"^USER (\d+)", text, re.M)
    return int(listen.group(2)), int(uid.group(1)) if uid else None


def check_compose(exe, ops_port):
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    for need in ("db", "fhir-sync", "fake-ehr"):
        if need not in services:
            problem(f"compose.yaml: no service {need}")
    for name, service in services.items():
        where = f"compose.yaml: services.{name}"
        ours = service.get("image", "").startswith("fhir-sync")
        if ours and service.get("build") != ".":
            problem(f"{where}: builds the image from {service.get('build')!r}, not the repository")
        for dependency in service.get("depends_on") or {}:
            if dependency not in services:
                problem(f"{where}: depends on unknown service {dependency}")
        for mount in service.get("volumes") or []:
            source = mount.split(":")[0]
            if source.startswith("."):
                if not (ROOT / source).exists():
                    problem(f"{where}: mounts {source}, which does not exist")
            elif source not in volumes:
                problem(f"{where}: mounts volume {source}, which is not declared")
        if not ours:
            continue
        command = service.get("command") or []
        if service.get("entrypoint") == ["bash", "-c"]:
            for args in fhir_sync_invocations(" ".join(command)):
                cli_parses(exe, args, where)
        else:
            cli_parses(exe, command, where)
        token = (service.get("environment") or {}).get("FHIR_SYNC_OPS__API_TOKEN")
        if command[:1] == ["serve"]:
            if not token or len(token) < 16:
                problem(f"{where}: serve listens beyond loopback and needs an API token of 16+ characters")
            if not any(p.split(":")[-1] == str(ops_port) for p in service.get("ports") or []):
                problem(f"{where}: does not publish the ops port {ops_port}")
            jobs = [m.split(":")[0] for m in service.get("volumes") or [] if m.split(":")[1] == "/app/jobs"]
            for directory in jobs:
                files = {p.name: p.read_text() for p in (ROOT / directory).glob("*.toml")}
                if not files:
                    problem(f"{where}: {directory} holds no job file")
                check_jobs(exe, files, f"{where} ({directory})")
                for text in files.values():
                    base = re.search(r'base_url\s*=\s*"https?://([^/:"]+):(\d+)', text)
                    fake = services.get("fake-ehr", {}).get("command", [])
                    if base and base.group(1) == "fake-ehr":
                        origin = fake[fake.index("--origin") + 1] if "--origin" in fake else ""
                        listen = fake[fake.index("--listen") + 1] if "--listen" in fake else ""
                        if origin != f"http://fake-ehr:{base.group(2)}" or not listen.endswith(f":{base.group(2)}"):
                            problem(f"{where}: the job reaches fake-ehr:{base.group(2)}, but fake-ehr listens on {listen} as {origin}")


def check_kubernetes(exe, ops_port, uid):
    directory = ROOT / "deploy/kubernetes"
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    kustomization = next((d for n, d in docs if d.get("kind") == "Kustomization"), None)
    if kustomization:
        for resource in kustomization.get("resources", []):
            if not (directory / resource).exists():
                problem(f"deploy/kubernetes/kustomization.yaml: lists {resource}, which does not exist")
    config_maps = {d["metadata"]["name"]: d for _, d in docs if d.get("kind") == "ConfigMap"}
    deployments = [(n, d) for n, d in docs if d.get("kind") == "Deployment"]
    if not deployments:
        problem("deploy/kubernetes: no Deployment")
    routes = ops_routes()
    guide = (ROOT / "docs/deployment.md").read_text() if (ROOT / "docs/deployment.md").exists() else ""
    for name, deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        where = f"deploy/kubernetes/{name}"
        if uid is not None and pod.get("securityContext", {}).get("runAsUser") != uid:
            problem(f"{where}: the pod does not run as the image's user {uid}")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume and volume["configMap"]["name"] not in config_maps:
                problem(f"{where}: volume {volume['name']} uses ConfigMap {volume['configMap']['name']}, not defined here")
            if "secret" in volume and volume["secret"]["secretName"] not in guide:
                problem(f"{where}: Secret {volume['secret']['secretName']} is not explained in docs/deployment.md")
        for container in pod["containers"]:
            cli_parses(exe, container.get("args", []), where)
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            env = {e["name"]: e for e in container.get("env", [])}
            listen = env.get("FHIR_SYNC_OPS__LISTEN", {}).get("value", "")
            if not listen.endswith(f":{ops_port}") or ops_port not in ports.values():
                problem(f"{where}: the ops server must listen on and expose {ops_port} (listens on {listen!r})")
            for e in env.values():
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in guide:
                    problem(f"{where}: Secret {ref['name']} is not explained in docs/deployment.md")
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            for path, volume in mounts.items():
                if volume not in volumes:
                    problem(f"{where}: mounts unknown volume {volume}")
            token_file = env.get("FHIR_SYNC_OPS__API_TOKEN_FILE", {}).get("value")
            if not token_file or not any(token_file.startswith(p + "/") for p in mounts):
                problem(f"{where}: FHIR_SYNC_OPS__API_TOKEN_FILE ({token_file}) is not in a mounted volume")
            for probe in ("livenessProbe", "readinessProbe"):
                get = container.get(probe, {}).get("httpGet")
                if not get:
                    problem(f"{where}: no {probe}")
                    continue
                if get["path"] not in routes:
                    problem(f"{where}: {probe} requests {get['path']}, which the ops server does not route")
                if ports.get(get["port"], get["port"]) != ops_port:
                    problem(f"{where}: {probe} probes port {get['port']}, not the ops port")
            jobs_mount = next((mounts[p] for p in mounts if p == "/app/jobs"), None)
            keys_mounts = [p for p, v in mounts.items() if "secret" in volumes.get(v, {})]
            if jobs_mount:
                config_map = config_maps.get(volumes[jobs_mount].get("configMap", {}).get("name"), {})
                jobs = config_map.get("data", {})
                check_jobs(exe, jobs, f"{where} (ConfigMap {config_map.get('metadata', {}).get('name')})")
                for job, text in jobs.items():
                    key = re.search(r'private_key_file\s*=\s*"([^"]+)"', text)
                    if key and not any(key.group(1).startswith(p + "/") for p in keys_mounts):
                        problem(f"{where}: {job} reads its key from {key.group(1)}, outside every mounted Secret")
            else:
                problem(f"{where}: no job files mounted at /app/jobs")


def main():
    exe = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/debug/fhir-sync")
    if not Path(exe).exists():
        sys.exit(f"scripts/check-deploy.py: {exe} does not exist; build it first (cargo build)")
    found = check_dockerfile()
    ops_port, uid = found if found else (8080, None)
    check_compose(exe, ops_port)
    check_kubernetes(exe, ops_port, uid)
    if problems:
        print("scripts/check-deploy.py: the deployment files disagree with the code:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        sys.exit(1)
    print("scripts/check-deploy.py: Dockerfile, compose.yaml and deploy/kubernetes agree with the code and each other")


if __name__ == "__main__":
    main()
