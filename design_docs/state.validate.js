function (newDoc, oldDoc, userCtx) {
  // couchsync/state-protection: the validate_doc_update of couchsync's own directory state database
  // (couchsync/directory). Only the sync identity writes there -- every document, every revision a
  // replication copies; every other client, other server admins included, is refused with a 403.
  // `identity` is rendered by `couchsync deploy-design-docs`; unrendered (null), it lets nobody through.
  var identity = /* couchsync:identity */ null;
  if (!identity || !userCtx) {
    throw({forbidden: "couchsync state: only the sync identity writes the directory state"});
  }
  if (userCtx.name && identity.names.indexOf(userCtx.name) >= 0) { return; }
  var roles = userCtx.roles || [];
  for (var i = 0; i < roles.length; i++) {
    if (identity.roles.indexOf(roles[i]) >= 0) { return; }
  }
  throw({forbidden: "couchsync state: only the sync identity writes the directory state"});
}
