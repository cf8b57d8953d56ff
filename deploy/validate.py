"""Structural checks of deploy/ that no off-the-shelf tool makes.

Run by .ci/validate-deploy after the real tools (docker-compose, kubernetes-validate, promtool,
hadolint) have checked syntax and schemas. These checks hold the files to each other: the
metric names to METRICS.md, Prometheus' targets to the compose services, Services and budgets
to the pods they select, and the security settings every Orderly pod must have.

    python3 deploy/validate.py metrics
    python3 deploy/validate.py compose RENDERED_COMPOSE_YAML
    python3 deploy/validate.py k8s RENDERED_MANIFESTS_YAML
    python3 deploy/validate.py grafana
    python3 deploy/validate.py dashboard-rules OUT_RULES_YAML
    python3 deploy/validate.py prometheus-k8s-copy OUT_CONFIG_YAML
    python3 deploy/validate.py dockerfile

Each prints what it checked and exits 1 with one line per problem.
"""

import json
import re
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
ROLES = {
    "migrate": ["migrate"],
    "command-api": ["command-api"],
    "read-api": ["read-api"],
    "projections": ["projections", "run"],
    "saga": ["saga", "run"],
}
HTTP_ROLES = ["command-api", "read-api", "projections", "saga"]
UID = 10001

problems: list[str] = []


def problem(text: str) -> None:
    problems.append(text)


def finish(what: str) -> None:
    if problems:
        for line in problems:
            print(f"  FAIL: {line}")
        print(f"{what}: {len(problems)} problem(s)")
        sys.exit(1)
    print(f"{what}: ok")


# --- metrics ---------------------------------------------------------------------------------


def documented_metrics() -> dict[str, str]:
    """name -> type, from the tables of METRICS.md (rows starting with a backticked name)."""
    metrics = {}
    for line in (DEPLOY / "METRICS.md").read_text().splitlines():
        m = re.match(r"^\| `([a-z_:][a-z0-9_:]*)` \| (counter|gauge|histogram) \|", line)
        if m:
            if m.group(1) in metrics:
                problem(f"METRICS.md lists {m.group(1)} twice")
            metrics[m.group(1)] = m.group(2)
    return metrics


def exported_series(metrics: dict[str, str]) -> set[str]:
    """Every series name the documented metrics produce (histograms: _bucket, _sum, _count)."""
    names = set()
    for name, kind in metrics.items():
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        else:
            names.add(name)
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "grafana/dashboards/orderly.json").read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())
    return [
        (rule.get("alert") or rule.get("record"), rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def test_series() -> list[tuple[str, str]]:
    tests = yaml.safe_load((DEPLOY / "prometheus/rules.test.yml").read_text())
    return [
        ("rules.test.yml", series["series"])
        for test in tests["tests"]
        for series in test.get("input_series", [])
    ]


def check_metrics() -> None:
    metrics = documented_metrics()
    if not metrics:
        problem("no metric rows found in METRICS.md")
    for name, kind in metrics.items():
        if not name.startswith("orderly_"):
            problem(f"METRICS.md: {name} lacks the orderly_ prefix")
        if kind == "counter" and not name.endswith("_total"):
            problem(f"METRICS.md: counter {name} does not end in _total")
        if kind != "counter" and name.endswith("_total"):
            problem(f"METRICS.md: {kind} {name} ends in _total, which is for counters")
    known = exported_series(metrics)
    used = set()
    sources = dashboard_exprs() + rule_exprs() + test_series()
    for where, expr in sources:
        for name in re.findall(r"\b(orderly_[a-z0-9_]+)", expr):
            used.add(name)
            if name not in known:
                problem(f"{where}: {name} is not in METRICS.md")
    print(f"metrics: {len(metrics)} documented in METRICS.md; {len(sources)} expressions "
          f"and test series checked against them")
    unused = sorted(
        name for name in metrics
        if not any(series in used for series in exported_series({name: metrics[name]}))
    )
    if unused:
        print(f"metrics: documented but shown nowhere yet (fine, listed for review): {', '.join(unused)}")
    finish("metrics")


# --- compose ---------------------------------------------------------------------------------


def check_compose(rendered: Path) -> None:
    compose = yaml.safe_load(rendered.read_text())
    services = compose.get("services", {})
    for name in ["postgres", "kurrentdb", "jaeger", "prometheus", "grafana", *ROLES]:
        if name not in services:
            problem(f"compose: service {name} missing")
    for name, command in ROLES.items():
        svc = services.get(name, {})
        if svc.get("command") != command:
            problem(f"compose: {name} runs {svc.get('command')}, expected {command}")
        if svc.get("image") != "orderly:local" or "build" not in svc:
            problem(f"compose: {name} must build and use the image orderly:local")
        env = svc.get("environment", {})
        for key in ["ORDERLY_DATABASE_URL", "ORDERLY_EVENT_STORE", "ORDERLY_KURRENTDB_URL",
                    "ORDERLY_HTTP_ADDR", "ORDERLY_LOG_FORMAT", "ORDERLY_OTLP_ENDPOINT"]:
            if key not in env:
                problem(f"compose: {name} lacks {key}")
        if env.get("ORDERLY_HTTP_ADDR", "").split(":")[0] != "0.0.0.0":
            problem(f"compose: {name} must listen on 0.0.0.0 inside its container")
        depends = svc.get("depends_on", {})
        if not isinstance(depends, dict):
            problem(f"compose: {name} depends_on must state conditions")
            continue
        if depends.get("postgres", {}).get("condition") != "service_healthy":
            problem(f"compose: {name} must wait for postgres to be healthy")
        if name != "migrate":
            if depends.get("migrate", {}).get("condition") != "service_completed_successfully":
                problem(f"compose: {name} must wait for migrate to complete")
            test = svc.get("healthcheck", {}).get("test", [])
            if "/readyz" not in " ".join(test):
                problem(f"compose: {name} healthcheck must probe /readyz")
    if services.get("migrate", {}).get("restart") not in ("no", None):
        problem("compose: migrate is one-shot and must not restart")
    kurrent_env = services.get("kurrentdb", {}).get("environment", {})
    if str(kurrent_env.get("KURRENTDB_MAX_APPEND_SIZE")) != "8388608":
        problem("compose: KurrentDB must accept 8 MiB appends (KURRENTDB_MAX_APPEND_SIZE=8388608)")
    for name, svc in services.items():
        if "healthcheck" not in svc and name not in ("jaeger", "grafana"):
            problem(f"compose: {name} has no healthcheck")
        for port in svc.get("ports", []):
            published = str(port.get("host_ip", "")) if isinstance(port, dict) else str(port)
            if isinstance(port, dict):
                ok = port.get("host_ip") == "127.0.0.1"
            else:
                ok = published.startswith("127.0.0.1:")
            if not ok:
                problem(f"compose: {name} publishes {port} beyond 127.0.0.1")
        for volume in svc.get("volumes", []):
            source = volume.get("source") if isinstance(volume, dict) else volume.split(":")[0]
            if source and source.startswith("/") and not Path(source).exists():
                problem(f"compose: {name} mounts {source}, which does not exist")

    # Prometheus scrapes exactly the HTTP roles, by service name, with their role label.
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = next((j for j in prom["scrape_configs"] if j["job_name"] == "orderly"), None)
    if job is None:
        problem("prometheus.yml: no job named orderly")
    else:
        targets = {
            t: group.get("labels", {}).get("role")
            for group in job.get("static_configs", [])
            for t in group["targets"]
        }
        # Scaled roles are found by DNS, each name's addresses labelled with the name.
        named_role = [
            r for r in job.get("relabel_configs", [])
            if r.get("source_labels") == ["__meta_dns_name"] and r.get("target_label") == "role"
        ]
        for sd in job.get("dns_sd_configs", []):
            for name in sd.get("names", []):
                labelled = any(re.fullmatch(r.get("regex", "(.*)"), name) for r in named_role)
                targets[f"{name}:{sd.get('port')}"] = name if labelled else None
        expected = {f"{role}:8080": role for role in HTTP_ROLES}
        if targets != expected:
            problem(f"prometheus.yml: orderly targets {targets} != compose roles {expected}")
    print(f"compose: {len(services)} services; roles, dependencies, health checks, host ports, "
          f"mounts and Prometheus targets checked")
    finish("compose")


# --- kubernetes ------------------------------------------------------------------------------


def check_k8s(rendered: Path) -> None:
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
        if doc["kind"] != "Namespace" and doc["metadata"].get("namespace") != "orderly":
            problem(f"k8s: {doc['kind']}/{doc['metadata']['name']} is not in namespace orderly")

    def pods():
        for kind in ("Deployment", "Job"):
            for name, doc in by_kind.get(kind, {}).items():
                yield kind, name, doc["spec"]["template"]

    for role in HTTP_ROLES:
        if f"orderly-{role}" not in by_kind.get("Deployment", {}):
            problem(f"k8s: no Deployment orderly-{role}")
    if "orderly-migrate" not in by_kind.get("Job", {}):
        problem("k8s: no Job orderly-migrate")

    for kind, name, template in pods():
        spec = template["spec"]
        labels = template["metadata"].get("labels", {})
        role = labels.get("app.kubernetes.io/component")
        where = f"k8s: {kind}/{name}"
        if labels.get("app.kubernetes.io/part-of") != "orderly":
            problem(f"{where}: pods lack app.kubernetes.io/part-of=orderly (Prometheus keeps only those)")
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") != UID:
            problem(f"{where}: must run as non-root UID {UID}, the image's user")
        if spec.get("automountServiceAccountToken") is not False:
            problem(f"{where}: must not mount a service account token")
        for c in spec["containers"]:
            csc = c.get("securityContext", {})
            if csc.get("readOnlyRootFilesystem") is not True:
                problem(f"{where}: readOnlyRootFilesystem must be true")
            if csc.get("allowPrivilegeEscalation") is not False:
                problem(f"{where}: allowPrivilegeEscalation must be false")
            if csc.get("capabilities", {}).get("drop") != ["ALL"]:
                problem(f"{where}: must drop all capabilities")
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in res.get(part, {}):
                        problem(f"{where}: no {part}.{resource}")
            if c.get("args") != ROLES.get(role):
                problem(f"{where}: runs {c.get('args')}, expected {ROLES.get(role)}")
            env = {e["name"]: e for e in c.get("env", [])}
            for e in env.values():
                if "value" in e and re.search(r"SECRET|PASSWORD|_URL$|KEY$", e["name"]):
                    problem(f"{where}: {e['name']} is set inline; secrets come from the Secret")
            if "ORDERLY_DATABASE_URL" not in env:
                problem(f"{where}: no ORDERLY_DATABASE_URL")
            if kind == "Deployment":
                if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
                    problem(f"{where}: readiness must probe /readyz")
                if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
                    problem(f"{where}: liveness must probe /healthz")
                ann = template["metadata"].get("annotations", {})
                if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != "8080":
                    problem(f"{where}: missing prometheus.io/scrape and port annotations")

    for name, dep in by_kind.get("Deployment", {}).items():
        role = dep["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        strategy = dep["spec"].get("strategy", {})
        if strategy.get("type") != "RollingUpdate":
            problem(f"k8s: Deployment/{name} must roll")
        if role in ("projections", "saga") and dep["spec"].get("replicas", 1) < 2:
            problem(f"k8s: Deployment/{name} needs 2 replicas for a standby")

    def selects(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    pod_labels = {name: t["metadata"]["labels"] for _, name, t in pods()}
    for name, svc in by_kind.get("Service", {}).items():
        hits = [p for p, labels in pod_labels.items() if selects(svc["spec"]["selector"], labels)]
        if not hits:
            problem(f"k8s: Service/{name} selects no pods")
    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        hits = [p for p, labels in pod_labels.items()
                if selects(pdb["spec"]["selector"]["matchLabels"], labels)]
        if len(hits) != 1:
            problem(f"k8s: PodDisruptionBudget/{name} selects {hits}, expected one Deployment")
    for role in HTTP_ROLES:
        if f"orderly-{role}" not in by_kind.get("PodDisruptionBudget", {}):
            problem(f"k8s: no PodDisruptionBudget for orderly-{role}")
    for role in ("command-api", "read-api"):
        hpa = by_kind.get("HorizontalPodAutoscaler", {}).get(f"orderly-{role}")
        if not hpa:
            problem(f"k8s: no HorizontalPodAutoscaler for orderly-{role}")
        elif hpa["spec"]["scaleTargetRef"]["name"] not in by_kind.get("Deployment", {}):
            problem(f"k8s: HorizontalPodAutoscaler/orderly-{role} targets a missing Deployment")
        if f"orderly-{role}" not in by_kind.get("Service", {}):
            problem(f"k8s: no Service for orderly-{role}")

    for name, cm in by_kind.get("ConfigMap", {}).items():
        for key, value in cm.get("data", {}).items():
            if re.search(r"SECRET|PASSWORD|PRIVATE", key) or re.search(r"://[^/@]*:[^/@]*@", str(value)):
                problem(f"k8s: ConfigMap/{name} holds a secret-looking {key}")
    for name, secret in by_kind.get("Secret", {}).items():
        for key, value in secret.get("stringData", {}).items():
            if "REPLACE_ME" not in value:
                problem(f"k8s: Secret/{name} key {key} is not a marked placeholder (REPLACE_ME)")
        if secret.get("data"):
            problem(f"k8s: Secret/{name} uses data; placeholders belong in stringData")
    print(f"k8s: {len(docs)} resources; security context, probes, resources, selectors, "
          f"autoscalers, budgets, config and secret placeholders checked")
    finish("k8s")


# --- grafana and prometheus ------------------------------------------------------------------


def check_grafana() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/datasources.yml").read_text())
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    uids = {d["uid"] for d in ds["datasources"]}
    if providers["providers"][0]["options"]["path"] != "/var/lib/grafana/dashboards":
        problem("grafana: the dashboard provider must read the folder compose.yaml mounts")
    for path in sorted((DEPLOY / "grafana/dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        ids = set()
        for panel in dash["panels"]:
            if panel["id"] in ids:
                problem(f"grafana: {path.name}: panel id {panel['id']} repeated")
            ids.add(panel["id"])
            for target in panel.get("targets", []) + ([panel] if "datasource" in panel else []):
                uid = target.get("datasource", {}).get("uid")
                if uid and uid not in uids:
                    problem(f"grafana: {path.name}: '{panel['title']}' uses datasource {uid}, not provisioned")
        print(f"grafana: {path.name}: {len(dash['panels'])} panels, datasources {sorted(uids)}")
    finish("grafana")


def dashboard_rules(out: Path) -> None:
    """The dashboard's queries as recording rules, so promtool parses every one of them."""
    rules = []
    for i, (title, expr) in enumerate(dashboard_exprs()):
        expr = (expr.replace("$__rate_interval", "5m")
                .replace('"$role"', '".*"').replace('"$projection"', '".*"'))
        if "$" in expr:
            problem(f"dashboard: '{title}' uses a variable this check does not substitute")
        rules.append({"record": f"dashboard:panel_{i}", "expr": expr})
    out.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    print(f"dashboard: {len(rules)} queries written as recording rules to {out}")
    finish("dashboard-rules")


def prometheus_k8s_copy(out: Path) -> None:
    """prometheus-kubernetes.yml with its Kubernetes discovery swapped for a static target.

    Debian's promtool is built without Kubernetes service discovery and rejects
    kubernetes_sd_configs; the copy lets it check everything else (relabelling, rule files).
    The discovery block itself is checked here for its shape only."""
    src = DEPLOY / "prometheus/prometheus-kubernetes.yml"
    config = yaml.safe_load(src.read_text())
    for job in config["scrape_configs"]:
        sd = job.pop("kubernetes_sd_configs", None)
        if sd is not None:
            if not (isinstance(sd, list) and sd and sd[0].get("role") == "pod"):
                problem(f"{src.name}: job {job['job_name']}: expected one pod discovery")
            job["static_configs"] = [{"targets": ["placeholder:8080"]}]
    config["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in config.get("rule_files", [])]
    out.write_text(yaml.safe_dump(config))
    print(f"{src.name}: copy without Kubernetes discovery written to {out}")
    finish("prometheus-k8s-copy")


def check_dockerfile() -> None:
    """Every file the Dockerfile copies from the context exists and is not ignored."""
    text = (DEPLOY / "Dockerfile").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for line in text.splitlines():
        m = re.match(r"^COPY\s+(?!--from)(?:--\S+\s+)*(\S+)\s+\S+$", line)
        if m and m.group(1) != ".":
            path = REPO / m.group(1)
            if not path.exists():
                problem(f"Dockerfile copies {m.group(1)}, which does not exist")
            if m.group(1).startswith("deploy/docker/") and "!deploy/docker/" not in ignore:
                problem("Dockerfile.dockerignore must re-include deploy/docker/")
    for needed in ("ENTRYPOINT [\"orderly\"]", "CMD [\"serve\"]", "USER 10001", "EXPOSE 8080"):
        if needed not in text:
            problem(f"Dockerfile lacks {needed}")
    if "cargo build --release --locked --bin orderly" not in text:
        problem("Dockerfile must build with cargo build --release --locked --bin orderly")
    print("dockerfile: copied paths, ignore file, user, entrypoint and build command checked")
    finish("dockerfile")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], [Path(a) for a in sys.argv[2:]]
    commands = {
        "metrics": lambda: check_metrics(),
        "compose": lambda: check_compose(args[0]),
        "k8s": lambda: check_k8s(args[0]),
        "grafana": lambda: check_grafana(),
        "dashboard-rules": lambda: dashboard_rules(args[0]),
        "prometheus-k8s-copy": lambda: prometheus_k8s_copy(args[0]),
        "dockerfile": lambda: check_dockerfile(),
    }
    if cmd not in commands:
        sys.exit(__doc__)
    commands[cmd]()


if __name__ == "__main__":
    main()
