"""KubeVirt VMs move by live migration, not eviction: one ``VirtualMachineInstanceMigration`` per move.

Why: evicting a virt-launcher pod would kill the VM (or, with KubeVirt's eviction webhook, start
a migration we would not see). Creating a ``VirtualMachineInstanceMigration`` (kubevirt.io/v1,
``spec.vmiName``) asks virt-controller to live-migrate the VM; the scheduler picks the target
node as it does for an evicted pod's replacement. Completion is read from the migration's
``status.phase`` (``Succeeded`` / ``Failed``). A migration not finished within the timeout is
cancelled by deleting its object (KubeVirt aborts a migration whose object is deleted) and
reported Failed. A VMI that already has a migration under way is not migrated twice: that
migration is followed instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GROUP = "kubevirt.io"
VERSION = "v1"
VMI_KIND = "VirtualMachineInstance"
PLURAL = "virtualmachineinstancemigrations"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
FINAL = frozenset({SUCCEEDED, FAILED})
LABEL = "wattplane.io/migrated-by"


@dataclass
class VMMigration:
    pod: str  # "ns/name" of the virt-launcher pod the plan named
    namespace: str
    vmi: str
    name: str  # the VirtualMachineInstanceMigration object
    phase: str = ""
    message: str = ""
    started: float | None = None


def owning_vmi(pod: Any) -> str | None:
    """The VMI a (virt-launcher) pod belongs to, from its controller ownerReference."""
    for ref in getattr(pod.metadata, "owner_references", None) or []:
        if ref.kind == VMI_KIND and ref.api_version.startswith(GROUP + "/"):
            return str(ref.name)
    return None


def start_migration(custom: Any, ns: str, vmi: str, pod: str) -> VMMigration:
    """Create the migration (or adopt one already running for this VMI)."""
    for obj in custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL).get("items", []):
        phase = (obj.get("status") or {}).get("phase", "")
        if (obj.get("spec") or {}).get("vmiName") == vmi and phase not in FINAL:
            return VMMigration(pod, ns, vmi, obj["metadata"]["name"], phase, "adopted a migration already under way")
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": f"{vmi[:40]}-wattplane-", "namespace": ns, "labels": {LABEL: "wattplane"}},
        "spec": {"vmiName": vmi},
    }
    created = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    return VMMigration(pod, ns, vmi, created["metadata"]["name"])


def finished(custom: Any, m: VMMigration, clock: Callable[[], float], timeout_s: float) -> bool:
    """True once the migration Succeeded or Failed, or timed out (then it is cancelled)."""
    from kubernetes import client

    now = clock()
    if m.started is None:
        m.started = now
    try:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, m.namespace, PLURAL, m.name)
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        m.phase, m.message = FAILED, f"migration {m.name} disappeared before it finished"
        return True
    status = obj.get("status") or {}
    m.phase = status.get("phase", "")
    if m.phase in FINAL:
        m.message = f"live migration {m.name} of VMI {m.vmi}: {m.phase}"
        return True
    if now - m.started > timeout_s:
        try:
            custom.delete_namespaced_custom_object(GROUP, VERSION, m.namespace, PLURAL, m.name)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
        m.phase, m.message = FAILED, f"live migration {m.name} of VMI {m.vmi} timed out after {timeout_s:g}s: cancelled"
        return True
    return False
