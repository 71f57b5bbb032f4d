"""An instance and its organization's directory state held in dicts, to apply events to in unit tests (as
sync does, minus CouchDB): each event merged into the state, then projected into the instance."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

from couchsync.documents import CONTACTS, GROUPS, TAG, choose_leaf
from couchsync.events import GroupEvent
from couchsync.plan import InstanceView, Plan, group_changes, plan_group_changes
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
        return self.plan_batch([event])

    def plan_batch(self, events: list[GroupEvent]) -> Plan:
        """The projection of the state, as it is, after these events of one organization (as sync does)."""
        org = events[0].organization_id
        states = {}
        for event in events:
            state = self.states.get(group_state_id(org, event.group_id)) or GroupState(org, event.group_id)
            assert isinstance(state, GroupState)
            states[state.group_id] = state
        changes = group_changes(events, states)
        named = set().union(*(change.named for change in changes))
        people = {email: self.states[person_state_id(org, email)] for email in named
                  if person_state_id(org, email) in self.states}
        groups = {group_id: choose_leaf([copy.deepcopy(doc)], org) for group_id, doc in self.docs[GROUPS].items()
                  if group_id in states}
        view = InstanceView(self.domain, self.owner_email, groups,
                            tuple(copy.deepcopy(list(self.docs[CONTACTS].values()))))
        return plan_group_changes(changes, people, view)  # type: ignore[arg-type]

    def apply(self, event: GroupEvent) -> Plan:
        return self.apply_batch([event])

    def apply_batch(self, events: list[GroupEvent]) -> Plan:
        """Events merged into the state one by one, then projected once (what a batch of the worker does)."""
        for event in events:
            self.merge(event)
        plan = self.plan_batch(events)
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
