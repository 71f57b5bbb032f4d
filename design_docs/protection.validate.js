function (newDoc, oldDoc, userCtx) {
  // couchsync/protection: the validate_doc_update of every io.cozy.contacts and io.cozy.contacts.groups
  // database. Only the sync identity may create, change or delete a managed document
  // (twakeDirectory.managed === true), touch twakeDirectory on any document, or add or remove a
  // relationship to a managed group (id b2b-group-...). Everyone else -- users, apps, replications, the
  // stack and other server admins -- is refused with a 403 whose reason names the rule. The one change
  // left to them on a managed contact: relationships to their own (unmanaged) groups.
  // The ids couchsync derives (b2b-group-..., b2b-contact-...) are reserved: apart from that one change
  // to a managed document, and the deletion of a document that squats such an id, nobody else writes
  // them. This also covers a revision with no parent here (a disjoint branch written with
  // new_edits=false, whose oldDoc is null): otherwise it could win over the managed revision.
  // CouchDB runs this for PUT, DELETE, every document of _bulk_docs and every replicated revision.
  // ES5 only: CouchDB's SpiderMonkey and PouchDB Server both run it. `identity` is rendered by
  // `couchsync deploy-design-docs`; unrendered (null), it lets nobody through (fail closed).
  // The file starts with `function`: servers evaluate it as an expression, which a leading comment breaks.
  var identity = /* couchsync:identity */ null;
  var TAG = "twakeDirectory";
  var MANAGED_GROUP = /^b2b-group-/;
  var RESERVED_ID = /^b2b-(group|contact)-/;

  function has(object, key) {
    return object !== null && typeof object === "object" && Object.prototype.hasOwnProperty.call(object, key);
  }
  function isArray(value) {
    return Object.prototype.toString.call(value) === "[object Array]";
  }
  function isManaged(doc) {
    return has(doc, TAG) && has(doc[TAG], "managed") && doc[TAG].managed === true;
  }
  function isSync() {
    if (!identity || !userCtx) { return false; }
    if (userCtx.name && identity.names.indexOf(userCtx.name) >= 0) { return true; }
    var roles = userCtx.roles || [];
    for (var i = 0; i < roles.length; i++) {
      if (identity.roles.indexOf(roles[i]) >= 0) { return true; }
    }
    return false;
  }
  function refuse(rule, why) {
    throw({forbidden: "couchsync " + rule + ": " + why});
  }
  // Deep equality that ignores key order: a client that re-serialises a document changes nothing.
  function equal(a, b) {
    if (a === b) { return true; }
    if (a === null || b === null || typeof a !== "object" || typeof b !== "object") { return false; }
    if (isArray(a) !== isArray(b)) { return false; }
    var keys = Object.keys(a);
    if (keys.length !== Object.keys(b).length) { return false; }
    for (var i = 0; i < keys.length; i++) {
      if (!has(b, keys[i]) || !equal(a[keys[i]], b[keys[i]])) { return false; }
    }
    return true;
  }
  function groupRefs(doc, managed) {
    var data = has(doc, "relationships") && has(doc.relationships, "groups") && doc.relationships.groups.data;
    var refs = [];
    if (!isArray(data)) { return refs; }
    for (var i = 0; i < data.length; i++) {
      var isOurs = has(data[i], "_id") && MANAGED_GROUP.test(String(data[i]._id));
      if (isOurs === managed) { refs.push(data[i]); }
    }
    return refs;
  }
  // The document without CouchDB's bookkeeping and without its group relationships (judged apart);
  // an emptied relationships object counts as absent.
  function fields(doc) {
    var copy = {};
    for (var key in doc) {
      if (has(doc, key) && key !== "_rev" && key !== "_revisions") { copy[key] = doc[key]; }
    }
    if (has(copy, "relationships") && has(copy.relationships, "groups")) {
      var relationships = {}, groups = {};
      for (var r in copy.relationships) { if (has(copy.relationships, r)) { relationships[r] = copy.relationships[r]; } }
      for (var g in relationships.groups) { if (has(relationships.groups, g) && g !== "data") { groups[g] = relationships.groups[g]; } }
      delete relationships.groups;
      if (Object.keys(groups).length) { relationships.groups = groups; }
      copy.relationships = relationships;
      if (!Object.keys(relationships).length) { delete copy.relationships; }
    }
    return copy;
  }

  if (isSync()) { return; }
  var live = oldDoc && !oldDoc._deleted ? oldDoc : null;

  if (isManaged(oldDoc)) {
    if (newDoc._deleted) { refuse("managed-delete", "only the directory sync may delete a managed document"); }
    if (!has(newDoc, TAG)) { refuse("tag-strip", "only the directory sync may remove twakeDirectory"); }
    if (!equal(oldDoc[TAG], newDoc[TAG])) { refuse("tag-change", "only the directory sync may change twakeDirectory"); }
    var data = has(newDoc, "relationships") && has(newDoc.relationships, "groups") && newDoc.relationships.groups.data;
    var ownGroupsChanged = !equal(groupRefs(oldDoc, false), groupRefs(newDoc, false));
    if (!equal(fields(oldDoc), fields(newDoc)) || (data && !isArray(data))
        || (ownGroupsChanged && oldDoc[TAG].kind !== "contact")) {
      refuse("managed-change", "a managed document is the directory's; only relationships to your own groups " +
             "may change on a managed contact");
    }
  } else if ((!newDoc._deleted || isManaged(newDoc)) && !equal(has(live, TAG) ? live[TAG] : undefined, newDoc[TAG])) {
    // A plain deletion of an unmanaged document drops its body, tag included: that is allowed.
    if (!has(newDoc, TAG)) { refuse("tag-strip", "only the directory sync may remove twakeDirectory"); }
    if (has(live, TAG)) { refuse("tag-change", "only the directory sync may change twakeDirectory"); }
    if (!live && isManaged(newDoc)) {
      refuse("managed-create", "only the directory sync may create a document with twakeDirectory.managed");
    }
    refuse("tag-forge", "only the directory sync may add twakeDirectory to a document");
  }
  if (!newDoc._deleted && !equal(groupRefs(live, true), groupRefs(newDoc, true))) {
    refuse("managed-relationship", "only the directory sync may add or remove a relationship to a managed group");
  }
  if (RESERVED_ID.test(String(newDoc._id)) && !isManaged(live) && !(newDoc._deleted && live)) {
    refuse("reserved-id", "ids b2b-group-... and b2b-contact-... are the directory sync's");
  }
}
