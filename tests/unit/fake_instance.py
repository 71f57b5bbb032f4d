"""An instance held in dicts, to apply plans to in unit tests (as sync does, minus CouchDB)."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

from couchsync.documents import CONTACTS, GROUPS, TAG
from couchsync.plan import InstanceView, Plan, plan_group_event

_revs = itertools.count(1)


@dataclass
class FakeInstance:
    domain: str
    owner_email: str | None = None
    docs: dict[str, dict[str, dict]] = field(default_factory=lambda: {GROUPS: {}, CONTACTS: {}})
    revisions: int = 0

    def put(self, doctype: str, doc: dict) -> None:
        self.docs[doctype][doc["_id"]] = {**copy.deepcopy(doc), "_rev": f"{next(_revs)}-x"}

    def view(self, group_id: str) -> InstanceView:
        return InstanceView(self.domain, self.owner_email, copy.deepcopy(self.docs[GROUPS].get(group_id)),
                            tuple(copy.deepcopy(list(self.docs[CONTACTS].values()))))

    def plan(self, event) -> Plan:
        from couchsync.documents import managed_group_id
        return plan_group_event(event, self.view(managed_group_id(event.organization_id, event.group_id)))

    def apply(self, event) -> Plan:
        plan = self.plan(event)
        self._put_all(plan)
        return plan

    def managed(self) -> dict[str, dict[str, dict]]:
        """Managed live documents without revisions: what the directory looks like."""
        return {doctype: {doc_id: {k: v for k, v in doc.items() if k != "_rev"}
                          for doc_id, doc in docs.items() if not doc.get("_deleted") and TAG in doc}
                for doctype, docs in self.docs.items()}

    def copy_from(self, reference: FakeInstance, members=()) -> list[Plan]:
        """What DirectoryCopy does, in one page: the reference's managed groups, then its contacts."""
        from couchsync.mirror import group_state, person_of, plan_contact_copies, plan_group_copies

        def live_managed(doctype):
            return [copy.deepcopy(doc) for doc in reference.docs[doctype].values()
                    if not doc.get("_deleted") and (doc.get(TAG) or {}).get("managed") is True]

        plans = [plan_group_copies(live_managed(GROUPS), copy.deepcopy(self.docs[GROUPS]))]
        self._put_all(plans[-1])
        memories = {doc_id: group_state(doc) for doc_id, doc in self.docs[GROUPS].items()
                    if (doc.get(TAG) or {}).get("managed") is True}
        people = [person_of(doc) for doc in live_managed(CONTACTS)] + list(members)
        view = InstanceView(self.domain, self.owner_email, contacts=tuple(copy.deepcopy(
            [doc for doc in self.docs[CONTACTS].values() if not doc.get("_deleted")])))
        plans.append(plan_contact_copies(people, "acme", view, memories))
        self._put_all(plans[-1])
        return plans

    def _put_all(self, plan: Plan) -> None:
        for write in plan.writes:
            self.put(write.doctype, write.doc)
            self.revisions += 1
