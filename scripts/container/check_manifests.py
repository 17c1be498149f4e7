"""What a schema cannot check: deploy/kubernetes agrees with the image and the config.

    check_manifests.py DEPLOY_DIR DOCKERFILE CONFIG_TOML

Prints one line per disagreement and exits 1 when there is any. Checks: the pod runs as the
Dockerfile's numeric USER, non-root, on a read-only root filesystem, with every capability
dropped and no privilege escalation; the grace period is above shutdown.deadline_ms;
liveness is /healthz and readiness /readyz on the admin port; the state volume is a claim
mounted at the image's VOLUME; tokens come from a Secret; memory is requested; the only
Service exposes the gateway port and not the admin port; the token files come from the
Secret the README makes and uid 10001 can read them.
"""

import pathlib
import re
import sys
import tomllib

import yaml


def main(deploy: str, dockerfile: str, config: str) -> int:
    docs = []
    for path in sorted(pathlib.Path(deploy).glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)

    docker = pathlib.Path(dockerfile).read_text()
    uid = int(re.search(r"^USER (\d+)", docker, re.M).group(1))
    volume = re.search(r'^VOLUME \["([^"]+)"\]', docker, re.M).group(1)
    deadline_ms = tomllib.loads(pathlib.Path(config).read_text())["shutdown"]["deadline_ms"]

    errors = []

    def need(ok, what):
        if not ok:
            errors.append(what)

    sets = by_kind.get("StatefulSet", [])
    need(len(sets) == 1, f"expected one StatefulSet, found {len(sets)}")
    if sets:
        spec = sets[0]["spec"]
        pod = spec["template"]["spec"]
        need(spec.get("replicas") == 1, "StatefulSet replicas must be 1 (one process owns the state)")
        need(
            pod.get("terminationGracePeriodSeconds", 30) * 1000 > deadline_ms,
            f"terminationGracePeriodSeconds must be above shutdown.deadline_ms ({deadline_ms} ms)",
        )
        pod_sc = pod.get("securityContext", {})
        (container,) = pod["containers"]
        sc = container.get("securityContext", {})

        def effective(key):
            return sc.get(key, pod_sc.get(key))

        need(effective("runAsNonRoot") is True, "runAsNonRoot must be true")
        need(effective("runAsUser") == uid, f"runAsUser must be the image's USER {uid}")
        need(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
        need(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
        need(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities must drop ALL")

        named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        need(named.get("gateway") == 18789 and named.get("admin") == 18790,
             "container ports must be gateway 18789 and admin 18790 (the image's)")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container.get(probe, {}).get("httpGet", {})
            need(get.get("path", "").split("?")[0] == path and get.get("port") in ("admin", 18790),
                 f"{probe} must GET {path} on the admin port")
        need("memory" in container.get("resources", {}).get("requests", {}),
             "the container must request memory")

        claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        need(mounts.get(volume) in claims, f"{volume} must be mounted from a volumeClaimTemplate")

        # The Secret the README makes: warden-tokens, keys gateway-token and admin-token,
        # mounted so that uid 10001 can read them (secret files belong to root, with the
        # pod's fsGroup as their group when it has one).
        secret_volumes = {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}
        secrets = set(secret_volumes)
        for name, secret in secret_volumes.items():
            need(secret.get("secretName") == "warden-tokens",
                 f"volume {name}: secretName must be warden-tokens (the README's)")
            mode = secret.get("defaultMode", 0o644)
            readable = mode & 0o004 or (pod_sc.get("fsGroup") == uid and mode & 0o040)
            need(readable, f"volume {name}: its files must be readable by uid {uid} "
                           "(fsGroup 10001 and a group-readable defaultMode)")
        env = {e["name"]: e for e in container.get("env", [])}
        for key in ("WARDEN_GATEWAY__TOKEN", "WARDEN_ADMIN__TOKEN"):
            from_file = env.get(key + "_FILE", {}).get("value", "")
            from_secret = "secretKeyRef" in env.get(key, {}).get("valueFrom", {})
            in_secret_mount = any(
                from_file.startswith(path.rstrip("/") + "/") and name in secrets
                for path, name in mounts.items()
            )
            need(from_secret or in_secret_mount, f"{key} must come from a Secret")
            expected = "gateway-token" if "GATEWAY" in key else "admin-token"
            need(from_secret or from_file.endswith("/" + expected),
                 f"{key}_FILE must name the Secret's key {expected}")

    services = by_kind.get("Service", [])
    need(len(services) == 1, f"expected one Service (the gateway's), found {len(services)}")
    for service in services:
        exposed = {p.get("targetPort") for p in service["spec"]["ports"]} | {
            p["port"] for p in service["spec"]["ports"]
        }
        need(exposed & {"gateway", 18789}, "the Service must expose the gateway port")
        need(not exposed & {"admin", 18790}, "the Service must not expose the admin port")

    for error in errors:
        print(f"deploy/kubernetes: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
