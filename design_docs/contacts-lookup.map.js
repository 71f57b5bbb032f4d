// couchsync/lookup: how couchsync finds contacts in an instance's io.cozy.contacts database.
// Keys: ["email", person key of the address] (every email[].address and twakeDirectory.email),
//       ["cozy", lower-case host of a cozy[].url], ["group", id of a related group].
// ES5 only: it runs in CouchDB's JavaScript engine (QuickJS or SpiderMonkey) and in PouchDB.
// The person key is couchsync/identity.py's rule, step by step: ASCII white space trimmed; NFC (except
// the three characters NFC would turn into ASCII, e.g. the Kelvin sign, kept as written); the domain's
// labels in IDNA ASCII form (ASCII letters lower-cased, `xn--` Punycode for any other); the local part's
// ASCII letters lower-cased, nothing else. An engine without String.prototype.normalize (SpiderMonkey
// before 31) skips NFC: couchsync writes addresses in NFC, only a decomposed one a user typed differs.
function (doc) {
  var seen = {};
  var KEEP = /[\u037E\u1FEF\u212A]/;
  function nfc(text) {
    if (typeof text.normalize !== "function") { return text; }
    var out = "", start = 0, i;
    for (i = 0; i < text.length; i++) {
      if (KEEP.test(text.charAt(i))) {
        out += text.slice(start, i).normalize("NFC") + text.charAt(i);
        start = i + 1;
      }
    }
    return out + text.slice(start).normalize("NFC");
  }
  function asciiLower(text) {
    return text.replace(/[A-Z]+/g, function (letters) { return letters.toLowerCase(); });
  }
  function digit(d) { return String.fromCharCode(d < 26 ? d + 97 : d + 22); }
  function adapt(delta, points, first) {
    var k = 0;
    delta = first ? Math.floor(delta / 700) : Math.floor(delta / 2);
    delta += Math.floor(delta / points);
    for (; delta > 455; k += 36) { delta = Math.floor(delta / 35); }
    return k + Math.floor(36 * delta / (delta + 38));
  }
  function codePoints(text) {
    var points = [], i, c, d;
    for (i = 0; i < text.length; i++) {
      c = text.charCodeAt(i);
      d = i + 1 < text.length ? text.charCodeAt(i + 1) : 0;
      if (c >= 0xD800 && c <= 0xDBFF && d >= 0xDC00 && d <= 0xDFFF) {
        c = (c - 0xD800) * 0x400 + d - 0xDC00 + 0x10000;
        i++;
      }
      points.push(c);
    }
    return points;
  }
  function punycode(label) {  // RFC 3492
    var input = codePoints(label), output = "", n = 128, delta = 0, bias = 72, handled, basic, m, q, t, k, i;
    for (i = 0; i < input.length; i++) { if (input[i] < 128) { output += String.fromCharCode(input[i]); } }
    handled = basic = output.length;
    if (basic) { output += "-"; }
    while (handled < input.length) {
      m = 0x7FFFFFFF;
      for (i = 0; i < input.length; i++) { if (input[i] >= n && input[i] < m) { m = input[i]; } }
      delta += (m - n) * (handled + 1);
      n = m;
      for (i = 0; i < input.length; i++) {
        if (input[i] < n) { delta++; }
        if (input[i] === n) {
          for (q = delta, k = 36; ; k += 36) {
            t = k <= bias ? 1 : (k >= bias + 26 ? 26 : k - bias);
            if (q < t) { break; }
            output += digit(t + (q - t) % (36 - t));
            q = Math.floor((q - t) / (36 - t));
          }
          output += digit(q);
          bias = adapt(delta, handled + 1, handled === basic);
          delta = 0;
          handled++;
        }
      }
      delta++;
      n++;
    }
    return output;
  }
  function personKey(address) {
    var text = nfc(address.replace(/^[ \t\n\r\u000B\f]+|[ \t\n\r\u000B\f]+$/g, ""));
    var at = text.lastIndexOf("@"), labels, i;
    if (at < 0) { return asciiLower(text); }
    labels = asciiLower(text.slice(at + 1)).split(".");
    for (i = 0; i < labels.length; i++) {
      if (/[^\u0000-\u007F]/.test(labels[i])) { labels[i] = "xn--" + punycode(labels[i]); }
    }
    return asciiLower(text.slice(0, at)) + "@" + labels.join(".");
  }
  function key(kind, value) {
    if (typeof value !== "string") { return; }
    value = kind === "group" ? value : kind === "email" ? personKey(value) : value.trim().toLowerCase();
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
