"""An instance and its organization's directory state held in dicts, to apply events to in unit tests (as
sync does, minus CouchDB): each event merged into the state, then projected into the instance."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

from couchsync.documents import CONTACTS, GROUPS, TAG, choose_leaf, is_live
from couchsync.events import GroupEvent, GroupEventKind
from couchsync.plan import InstanceView, Plan, plan_group_event
from couchsync.state import GroupState, PersonState, contribution, group_state_id, person_state_id

_revs = itertools.count(1)


@dataclass
class FakeInstance:
    domain: str
    owner_email: str | None = None
    docs: dict[str, dict[str, dict]] = field(default_factory=lambda: {GROUPS: {}, CONTACTS: {}})
    states: dict[str, GroupState | PersonState] = field(default_factory=dict)
    revisions: int = 0

    def put(self, doctype: str, doc: dict) -> None:
        if doc.get("_deleted"):
            self.docs[doctype].pop(doc["_id"], None)
            return
        self.docs[doctype][doc["_id"]] = {**copy.deepcopy(doc), "_rev": f"{next(_revs)}-x"}

    def merge(self, event: GroupEvent) -> None:
        for state in contribution(event):
            known = self.states.get(state.state_id)
            self.states[state.state_id] = known.joined(state) if known is not None else state  # type: ignore

    def plan(self, event: GroupEvent) -> Plan:
        """The projection of the state, as it is, after this event (merged already or not)."""
        org = event.organization_id
        group = self.states.get(group_state_id(org, event.group_id)) or GroupState(org, event.group_id)
        assert isinstance(group, GroupState)
        base = self.docs[GROUPS].get(group.group_id)
        named = {m.email.strip().lower() for m in event.members}
        if event.kind is GroupEventKind.CREATED and not is_live(base):
            named |= set(group.members)
        people = {email: self.states[person_state_id(org, email)] for email in named
                  if person_state_id(org, email) in self.states}
        groups = {group.group_id: choose_leaf([copy.deepcopy(base)], org)} if base else {}
        view = InstanceView(self.domain, self.owner_email, groups,
                            tuple(copy.deepcopy(list(self.docs[CONTACTS].values()))))
        related = not group.alive or event.kind is GroupEventKind.DELETED
        return plan_group_event(group, people, view, named=named, related=related)  # type: ignore

    def apply(self, event: GroupEvent) -> Plan:
        self.merge(event)
        plan = self.plan(event)
        self.put_all(plan)
        return plan

    def managed(self) -> dict[str, dict[str, dict]]:
        """Managed live documents without revisions: what the directory looks like."""
        return {doctype: {doc_id: {k: v for k, v in doc.items() if k != "_rev"}
                          for doc_id, doc in docs.items() if TAG in doc}
                for doctype, docs in self.docs.items()}

    def put_all(self, plan: Plan) -> None:
        for write in plan.writes:
            self.put(write.doctype, write.doc)
            self.revisions += 1

    def copy_from(self, organization: FakeInstance, members=()) -> list[Plan]:
        """What DirectoryCopy does, in one page: the organization's group states, then its people."""
        from couchsync.mirror import Person, plan_contact_copies, plan_group_copies

        groups = {s.group_id: copy.deepcopy(s) for s in organization.states.values() if isinstance(s, GroupState)}
        plans = [plan_group_copies(groups.values(), copy.deepcopy(self.docs[GROUPS]))]
        self.put_all(plans[-1])
        people = [Person(copy.deepcopy(s)) for s in organization.states.values() if isinstance(s, PersonState)]
        view = InstanceView(self.domain, self.owner_email, contacts=tuple(copy.deepcopy(
            list(self.docs[CONTACTS].values()))))
        plans.append(plan_contact_copies(people + list(members), view, groups))
        self.put_all(plans[-1])
        return plans
