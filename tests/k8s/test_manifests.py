"""k8s/ rendered with the real kubectl kustomize, every object validated offline (built-in kinds with
kubernetes-validate --strict, RayCluster and ScaledObject against the upstream CRDs), and the manifests
checked against the code. Each check is also run on a deliberately broken copy and must fail it."""

from __future__ import annotations

import copy

import pytest

from tests.k8s import validation as v

OVERLAYS = ["cpu", "gpu"]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, v.render(request.param)


@pytest.fixture(scope="module")
def gpu():
    return v.render("gpu")


def test_every_object_validates(rendered):
    overlay, docs = rendered
    problems = [p for doc in docs for p in v.schema_problems(doc)]
    assert problems == [], f"k8s/{overlay}: " + "\n".join(problems)


@pytest.mark.parametrize("check", v.ALL_CHECKS, ids=lambda c: c.__name__)
def test_consistent_with_the_code(rendered, check):
    overlay, docs = rendered
    assert check(docs) == [], f"k8s/{overlay}"


def test_overlays_run_what_they_say(gpu):
    assert v.gpu_problems(gpu) == []
    cpu = v.render("cpu")
    assert not v.find(cpu, "RayCluster") and not v.find(cpu, "ScaledObject")
    [deployment] = v.find(cpu, "Deployment", v.GATEWAY)
    assert deployment["spec"]["replicas"] == 1  # the newcomer's overlay: one gateway pod
    assert not any(e["name"] == "LONGBOW_SHARDS" for e in v.gateway_container(cpu).get("env", []))
    env = {e["name"]: e.get("value") for e in v.gateway_container(gpu)["env"]}
    assert int(env["LONGBOW_SHARDS"]) >= 1 and env["LONGBOW_RAY_ADDRESS"].startswith("ray://longbow-ray-head-svc:")
    images = {c["image"] for d in gpu for spec in v._pod_specs(d) for c in spec["containers"] if "longbow" in c["image"]}
    assert len(images) == 1 and "cuda" in images.pop(), "driver, head and workers must run one image"


# ---- each check fails a broken manifest -----------------------------------------------------------
def _broken(docs, kind, name, edit):
    docs = copy.deepcopy(docs)
    [target] = v.find(docs, kind, name)
    edit(target)
    return docs, target


def _container(doc):
    return doc["spec"]["template"]["spec"]["containers"][0]


def _set_toml(docs, old, new):
    config = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("longbow-config")][0]
    assert old in config["data"]["longbow.toml"]
    config["data"]["longbow.toml"] = config["data"]["longbow.toml"].replace(old, new)


def test_schema_check_rejects_a_typo_in_a_builtin_kind(gpu):
    _, deployment = _broken(gpu, "Deployment", v.GATEWAY, lambda d: _container(d).update(imagePullPolicyy="Always"))
    assert any("imagePullPolicyy" in p for p in v.schema_problems(deployment))
    _, service = _broken(gpu, "Service", v.GATEWAY, lambda d: d["spec"]["ports"][0].update(port="fifty"))
    assert v.schema_problems(service)


def test_schema_check_rejects_an_unknown_kind():
    problems = v.schema_problems({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    assert problems and "no schema" in problems[0]


def test_schema_check_rejects_broken_custom_resources(gpu):
    _, ray = _broken(gpu, "RayCluster", None, lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=3))
    assert any("maxReplica" in p for p in v.schema_problems(ray))
    _, ray = _broken(gpu, "RayCluster", None, lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"))
    assert any("groupName" in p for p in v.schema_problems(ray))
    _, scaled = _broken(gpu, "ScaledObject", None, lambda d: d["spec"].pop("triggers"))
    assert any("triggers" in p for p in v.schema_problems(scaled))
    _, scaled = _broken(gpu, "ScaledObject", None, lambda d: d["spec"].update(minReplicas=1))
    assert any("minReplicas" in p for p in v.schema_problems(scaled))


def test_crd_defaults_are_not_required(gpu):
    # rayStartParams has a default in the CRD: leaving it out is valid, as on the API server.
    _, ray = _broken(gpu, "RayCluster", None, lambda d: d["spec"]["workerGroupSpecs"][0].pop("rayStartParams"))
    assert v.schema_problems(ray) == []


def test_consistency_checks_fail_broken_copies(gpu):
    cases = [
        (v.gateway_problems, lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=20)),
        (v.gateway_problems, lambda d: _container(d)["readinessProbe"]["grpc"].update(service="longbow.v1.Generaton")),
        (v.gateway_problems, lambda d: _container(d)["livenessProbe"]["grpc"].update(port=50051)),
        (v.gateway_problems, lambda d: _container(d).update(args=["serve", "--shutdown-timeout-typo", "3"])),
        (v.gateway_problems, lambda d: _container(d).update(command=["python"])),
        (v.gateway_problems, lambda d: _container(d)["ports"][0].update(containerPort=8080)),
        (v.config_problems, lambda d: _container(d)["env"].append({"name": "LONGBOW_SHUTDOWN_TIMEOUT", "value": "3"})),
        (v.security_problems, lambda d: d["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot")),
        (v.policy_problems, lambda d: d["spec"]["template"]["metadata"]["labels"].update(
            {"app.kubernetes.io/component": "frontend"})),
    ]
    for check, edit in cases:
        docs, _ = _broken(gpu, "Deployment", v.GATEWAY, edit)
        assert check(docs), f"{check.__name__} accepted a broken manifest"


def test_config_redis_policy_and_autoscaler_checks_fail_broken_copies(gpu):
    docs = copy.deepcopy(gpu)
    _set_toml(docs, "shutdown_timeout_s = 30.0", "shutdown_timeout_s = 30.0\ndrain_seconds = 3")
    assert any("unknown config key" in p for p in v.config_problems(docs))
    docs, _ = _broken(gpu, "StatefulSet", "longbow-redis",
                      lambda d: _container(d).update(args=["redis-server", "--appendonly", "no"]))
    assert v.redis_problems(docs)
    docs = [d for d in copy.deepcopy(gpu) if d["metadata"]["name"] != "default-deny"]
    assert any("default-deny" in p for p in v.policy_problems(docs))
    docs, _ = _broken(gpu, "ScaledObject", None, lambda d: d["spec"]["triggers"][0]["metadata"].update(
        query="sum(longbow_queue_length)"))
    assert any("longbow_queue_length" in p for p in v.autoscaling_problems(docs))
    docs, _ = _broken(gpu, "RayCluster", None, lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update(
        {"num-gpus": "1"}))
    assert v.gpu_problems(docs)
