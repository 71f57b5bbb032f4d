// Runs a validate_doc_update function on a table of writes, as CouchDB calls it, with no server.
// stdin: {"source": "function (newDoc, oldDoc, userCtx) {...}", "cases": [{"newDoc", "oldDoc", "userCtx"}]}
// stdout: one result per case: {"ok": true}, {"forbidden": reason}, {"unauthorized": reason} or {"error": text}.
// The function runs in a fresh V8 context with no Node.js globals (no require, no process), as in
// CouchDB's sandbox; the documents are parsed inside that context so that they are its own objects.
"use strict";
const fs = require("fs");
const vm = require("vm");

const input = JSON.parse(fs.readFileSync(0, "utf8"));
const sandbox = vm.createContext({});
const validate = vm.runInContext("(" + input.source + ")", sandbox);
const parse = vm.runInContext("(function (text) { return JSON.parse(text); })", sandbox);

const results = input.cases.map((write) => {
  const args = parse(JSON.stringify([write.newDoc, write.oldDoc === undefined ? null : write.oldDoc, write.userCtx]));
  try {
    validate(args[0], args[1], args[2], {});
    return {ok: true};
  } catch (thrown) {
    if (thrown && typeof thrown.forbidden === "string") return {forbidden: thrown.forbidden};
    if (thrown && typeof thrown.unauthorized === "string") return {unauthorized: thrown.unauthorized};
    return {error: String(thrown)};
  }
});
process.stdout.write(JSON.stringify(results));
