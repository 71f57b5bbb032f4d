// couchsync/lookup: how couchsync finds contacts in an instance's io.cozy.contacts database.
// Keys: ["email", lower-case address] (every email[].address and twakeDirectory.email),
//       ["cozy", lower-case host of a cozy[].url], ["group", id of a related group].
// ES5 only: it runs in CouchDB's JavaScript engine and in PouchDB.
function (doc) {
  var seen = {};
  function key(kind, value) {
    if (typeof value !== "string") { return; }
    value = kind === "group" ? value : value.trim().toLowerCase();
    if (!value || seen[kind + "\u0000" + value]) { return; }
    seen[kind + "\u0000" + value] = true;
    emit([kind, value], null);
  }
  function host(url) {
    if (typeof url !== "string") { return null; }
    return url.replace(/^[a-zA-Z][a-zA-Z0-9+.-]*:\/\//, "").split(/[\/:?#]/)[0];
  }
  function each(list, fn) {
    if (Object.prototype.toString.call(list) === "[object Array]") { list.forEach(fn); }
  }
  each(doc.email, function (entry) { if (entry) { key("email", entry.address); } });
  if (doc.twakeDirectory) { key("email", doc.twakeDirectory.email); }
  each(doc.cozy, function (entry) { if (entry) { key("cozy", host(entry.url)); } });
  var groups = doc.relationships && doc.relationships.groups;
  each(groups && groups.data, function (item) { if (item) { key("group", item._id); } });
}
