"""`couchsync deploy-design-docs`: the protection and lookup design documents installed in every
instance (or checked, `--check`), the global indexes and the state database's own."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

import click

from couchsync import config, design_docs
from couchsync.cli.context import Context
from couchsync.cli.options import identity_options, sync_identity
from couchsync.cli.output import EXIT_FAILED
from couchsync.design_docs import Outcome, findings
from couchsync.errors import UnknownInstance, UnknownOrganization
from couchsync.instances import Instance, InstanceDirectory


@click.command("deploy-design-docs")
@click.option("--org", "org_id", metavar="ID", help="Only the instances of this organization.")
@click.option("--instance", "domain", metavar="DOMAIN", help="Only this instance.")
@click.option("--dry-run", is_flag=True, help="Print what would change and write nothing.")
@click.option("--create-missing", is_flag=True,
              help="Create contacts and groups databases that do not exist yet (needs server admin rights).")
@click.option("--check", is_flag=True, help="List the databases whose design documents are missing or differ "
              "from what would be deployed, and write nothing; exit 1 when there is any.")
@click.option("--json", "as_json", is_flag=True, help="With --check: one JSON document for machines.")
@click.option("--replace-newer", is_flag=True, help="Replace design documents a newer couchsync wrote (a "
              "rollback); without it they are left as they are.")
@identity_options
@click.pass_obj
def deploy_design_docs(obj: Context, org_id: str | None, domain: str | None, dry_run: bool,
                       create_missing: bool, check: bool, as_json: bool, replace_newer: bool,
                       sync_names: tuple[str, ...], sync_roles: tuple[str, ...]) -> None:
    """Install the protection and lookup design documents in every instance, and the global indexes.

    Every instance's io.cozy.contacts and io.cozy.contacts.groups databases get the validate_doc_update
    that lets only the sync identity write managed documents; the global database gets the by-orgid
    and by-orgdomain indexes. Unchanged design documents are left alone, and so are those a newer
    couchsync wrote (sealed by the sync identity) unless --replace-newer. Exits 1 when any database failed.
    """
    if org_id and domain:
        raise click.UsageError("--org and --instance exclude each other")
    if as_json and not check:
        raise click.UsageError("--json goes with --check")
    identity = sync_identity(obj, sync_names, sync_roles)
    if check:
        _check_design_docs(obj, identity, org_id, domain, as_json)
    design = obj.design()
    protection = design.protection(identity)
    with obj.gateway() as couch:
        # The global database first: its indexes serve the instance lookups that follow.
        outcomes = [design_docs.deploy(couch, design.global_target(obj.sync.global_db), dry_run=dry_run,
                                       create_missing=create_missing),
                    # couchsync's own database is made here whatever --create-missing says.
                    design_docs.deploy(couch, design.state_target(obj.sync.state_db, identity), dry_run=dry_run,
                                       create_missing=True, replace_newer=replace_newer)]
        # No index creation here: in a dry run it would be a write.
        instances = _chosen_instances(obj.directory(couch), org_id, domain)
        targets = [target for instance in instances for target in design.instance_targets(instance.prefix, protection)]
        with click.progressbar(length=len(targets), label="deploying", file=sys.stderr,
                               hidden=not sys.stderr.isatty()) as bar:
            for outcome in design_docs.deploy_all(couch, targets, concurrency=obj.sync.concurrency, dry_run=dry_run,
                                                  create_missing=create_missing, replace_newer=replace_newer):
                outcomes.append(outcome)
                bar.update(1)
    _print_deployment(outcomes, dry_run)
    sys.exit(EXIT_FAILED if any(outcome.error for outcome in outcomes) else 0)


def _check_design_docs(obj: Context, identity: config.SyncIdentity, org_id: str | None, domain: str | None,
                       as_json: bool) -> None:
    """`deploy-design-docs --check`: a dry run that lists only what is wrong, and exits 1 when anything is."""
    design = obj.design()
    protection = design.protection(identity)
    with obj.gateway() as couch:
        targets = [design.state_target(obj.sync.state_db, identity)]
        targets += [target for instance in _chosen_instances(obj.directory(couch), org_id, domain)
                    for target in design.instance_targets(instance.prefix, protection)]
        outcomes = list(design_docs.deploy_all(couch, targets, concurrency=obj.sync.concurrency, dry_run=True))
    broken = [(outcome.db, findings(outcome)) for outcome in outcomes if findings(outcome)]
    failed = [outcome for outcome in outcomes if outcome.error]
    missing = sum(1 for outcome in outcomes if outcome.missing)
    if as_json:
        click.echo(json.dumps({"checked": len(outcomes), "missing_databases": missing,
                               "broken": [{"db": db, "design_docs": dict(found)} for db, found in broken],
                               "failed": [{"db": outcome.db, "error": outcome.error} for outcome in failed]},
                              indent=2))
    else:
        for db, found in broken:
            click.echo(f"{db}: " + ", ".join(f"{ddoc} {state}" for ddoc, state in found))
        for outcome in failed:
            click.echo(f"failed {outcome.db}: {outcome.error}")
        click.echo(f"checked {len(outcomes)} databases: {len(broken)} with design documents missing or different, "
                   f"{missing} not created yet, {len(failed)} failed")
    sys.exit(EXIT_FAILED if broken or failed else 0)


def _chosen_instances(directory: InstanceDirectory, org_id: str | None, domain: str | None) -> list[Instance]:
    if domain:
        instance = directory.instance(domain)
        if instance is None:
            raise UnknownInstance(f"no usable instance has the domain {domain!r}")
        return [instance]
    if org_id:
        instances = directory.instances_of(org_id, one_reference=False)  # the protection goes to each
        if not instances:
            raise UnknownOrganization(f"organization {org_id!r} has no instance")
        return instances
    return list(directory.every_instance())


_VERBS = {"installed": "install", "updated": "update"}


def _print_deployment(outcomes: Iterable[Outcome], dry_run: bool) -> None:
    counts = {"installed": 0, "updated": 0, "unchanged": 0, design_docs.NEWER: 0}
    missing, failed, created = [], [], 0
    for outcome in outcomes:
        created += outcome.created
        if dry_run and outcome.created:
            click.echo(f"would create {outcome.db}")
        for ddoc, status in outcome.results:
            counts[status] += 1
            if dry_run and status in _VERBS:
                click.echo(f"would {_VERBS[status]} {ddoc} in {outcome.db}")
        if outcome.missing:
            missing.append(outcome.db)
        if outcome.error:
            failed.append(outcome)
    for db in missing:
        click.echo(f"missing {db} (not created: --create-missing creates it)")
    for outcome in failed:
        click.echo(f"failed {outcome.db}: {outcome.error}")
    verb = "would be " if dry_run else ""
    newer = f", left as a newer couchsync wrote them: {counts[design_docs.NEWER]} (--replace-newer replaces them)" \
        if counts[design_docs.NEWER] else ""
    click.echo(f"design documents {verb}installed: {counts['installed']}, {verb}updated: {counts['updated']}, "
               f"unchanged: {counts['unchanged']}{newer}; databases {verb}created: {created}, missing: {len(missing)}, "
               f"failed: {len(failed)}")
