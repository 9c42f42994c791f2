"""RBAC for the tests: the access a request needs, and what a set of RBAC
objects (the chart rendered, manifests/rbac.yaml) grants one service account,
evaluated as the API server's RBAC authorizer does (without wildcards and
aggregation, which vramctl's objects never use: tests/k8s/test_manifests.py).

The emulator (tests/support/k8s/emulator.py) records an ``Access`` for every request
vramctl and kopf make and, given ``Grants``, refuses the others with 403."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

Rule = tuple[str, str, str]  # (API group, resource[/subresource], verb)


class Access(NamedTuple):
    """What an RBAC rule must grant for one request; ``namespace`` None: at the cluster scope."""

    namespace: str | None
    group: str
    resource: str
    verb: str

    @property
    def rule(self) -> Rule:
        return (self.group, self.resource, self.verb)


def access_of(method: str, path: str, watch: str | None = None) -> Access | None:
    """The access this request needs; None for discovery (/api, /apis, /version)."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) != 2:
        namespace, rest = rest[1], rest[2:]  # namespaced: namespaces/<ns>/<resource>...
    if not rest:
        return None
    resource = rest[0] + (f"/{rest[2]}" if len(rest) >= 3 else "")
    named = len(rest) >= 2
    verb = {
        "GET": "get" if named else ("watch" if watch in ("true", "1") else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }.get(method.upper())
    return Access(namespace, group, resource, verb) if verb else None


def rules_of(role: Mapping[str, Any]) -> set[Rule]:
    """A Role's or ClusterRole's rules, one (group, resource, verb) each."""
    out: set[Rule] = set()
    for rule in role.get("rules") or []:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), f"not evaluated here: {rule}"
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    assert "*" not in (g, r, v), f"wildcards are not evaluated here: {rule}"
                    out.add((g, r, v))
    return out


@dataclass(frozen=True)
class Grants:
    """What the bindings among some RBAC objects grant one service account."""

    user: str  # system:serviceaccount:<namespace>:<name>
    cluster: frozenset[Rule]  # ClusterRoles bound by ClusterRoleBindings: every namespace and the cluster scope
    namespaced: Mapping[str, frozenset[Rule]] = field(default_factory=dict)  # RoleBindings: their namespace only

    def allows(self, access: Access) -> bool:
        if access.rule in self.cluster:
            return True
        return access.namespace is not None and access.rule in self.namespaced.get(access.namespace, frozenset())

    def forbidden_message(self, access: Access, name: str | None = None) -> str:
        """The API server's words for a refused request (what vramctl recognizes)."""
        what = f'{access.resource.split("/")[0]} "{name}"' if name else access.resource.split("/")[0]
        where = f'in the namespace "{access.namespace}"' if access.namespace is not None else "at the cluster scope"
        return (
            f'{what} is forbidden: User "{self.user}" cannot {access.verb} resource "{access.resource}" '
            f'in API group "{access.group}" {where}'
        )


def grants_of(objects: Iterable[Mapping[str, Any]], namespace: str, name: str) -> Grants:
    """What ``objects`` grant the service account ``namespace/name``."""
    objects = list(objects)
    cluster_roles = {o["metadata"]["name"]: rules_of(o) for o in objects if o["kind"] == "ClusterRole"}
    roles = {(o["metadata"]["namespace"], o["metadata"]["name"]): rules_of(o) for o in objects if o["kind"] == "Role"}
    subject = {"kind": "ServiceAccount", "name": name, "namespace": namespace}
    cluster: set[Rule] = set()
    namespaced: dict[str, set[Rule]] = {}
    for b in objects:
        if b["kind"] not in ("ClusterRoleBinding", "RoleBinding") or subject not in (b.get("subjects") or []):
            continue
        ref = b["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io", ref
        if b["kind"] == "ClusterRoleBinding":
            assert ref["kind"] == "ClusterRole", ref
            cluster |= cluster_roles.get(ref["name"], set())
        else:
            ns = b["metadata"]["namespace"]
            found = cluster_roles.get(ref["name"]) if ref["kind"] == "ClusterRole" else roles.get((ns, ref["name"]))
            namespaced.setdefault(ns, set()).update(found or set())
    return Grants(
        f"system:serviceaccount:{namespace}:{name}",
        frozenset(cluster),
        {ns: frozenset(rules) for ns, rules in namespaced.items()},
    )


# The ClusterRole: what vramctl and kopf need in every namespace (see manifests/rbac.yaml for why each is there).
EXPECTED_RULES = [
    {"apiGroups": ["vramctl.io"], "resources": ["modeldeployments"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": ["vramctl.io"], "resources": ["modeldeployments/status"], "verbs": ["update", "patch"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]
# The Role of each namespace where the Pod runtime (the default) runs Pods:
# what tests/k8s/test_rbac.py records it calling there.
POD_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": ["vramctl.io"], "resources": ["modeldeployments/finalizers"], "verbs": ["update"]},
]
