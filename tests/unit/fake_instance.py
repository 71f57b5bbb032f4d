"""An instance and its organization's directory state held in dicts, to apply events to in unit tests (as
sync does, minus CouchDB): each event merged into the state, then projected into the instance."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from datetime import timedelta

from couchsync.documents import CONTACTS, GROUPS, TAG, choose_leaf
from couchsync.events import GroupEvent
from couchsync.plan import InstanceView, Plan, group_changes, plan_group_changes
from couchsync.state import GroupState, PersonState, admit, group_state_id, person_state_id, profiles

_revs = itertools.count(1)


@dataclass
class FakeInstance:
    domain: str
    owner_email: str | None = None
    docs: dict[str, dict[str, dict]] = field(default_factory=lambda: {GROUPS: {}, CONTACTS: {}})
    states: dict[str, GroupState | PersonState] = field(default_factory=dict)
    revisions: int = 0
    horizon: timedelta = timedelta(days=90)  # the state's (see couchsync.state.admit)
    stale: list[GroupEvent] = field(default_factory=list)  # events refused as stale, in arrival order
    admitted: list[GroupEvent] = field(default_factory=list)  # events merged, in arrival order

    def put(self, doctype: str, doc: dict) -> None:
        if doc.get("_deleted"):
            self.docs[doctype].pop(doc["_id"], None)
            return
        self.docs[doctype][doc["_id"]] = {**copy.deepcopy(doc), "_rev": f"{next(_revs)}-x"}

    def merge(self, event: GroupEvent) -> None:
        self.admit([event])

    def admit(self, events: list[GroupEvent]) -> list[GroupEvent]:
        """Events merged as the state store merges them: each group admits its own (refusing the stale),
        then the profiles of those admitted; the events admitted."""
        by_group: dict[str, list[GroupEvent]] = {}
        for event in events:
            by_group.setdefault(group_state_id(event.organization_id, event.group_id), []).append(event)
        for state_id, mine in by_group.items():
            known = self.states.get(state_id)
            admission = admit(known if isinstance(known, GroupState) else None, mine, self.horizon)
            self.states[state_id] = admission.state
            self.stale += admission.stale
        admitted = [event for event in events if event not in self.stale]
        self.admitted += admitted
        for state in (state for event in admitted for state in profiles(event)):
            known = self.states.get(state.state_id)
            self.states[state.state_id] = known.joined(state) if known is not None else state  # type: ignore
        return admitted

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
        """Events merged into the state together, then those admitted projected once (what a batch of the
        worker does)."""
        admitted = self.admit(events)
        plan = self.plan_batch(admitted) if admitted else Plan()
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
