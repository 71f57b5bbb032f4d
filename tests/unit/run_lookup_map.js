// Runs the couchsync/lookup map function on documents, as CouchDB calls it, with no server.
// stdin, one JSON value a line: the function's source first, then documents; stdout: one line per
// document, the keys it emitted. It runs in a fresh V8 context with no Node.js globals, as in CouchDB's
// sandbox; `emit` is the only global it is given. One process serves a whole test module.
"use strict";
const readline = require("readline");
const vm = require("vm");

let emitted = [];
const sandbox = vm.createContext({emit: (key) => { emitted.push(key); }});
const parse = vm.runInContext("(function (text) { return JSON.parse(text); })", sandbox);
let map = null;

readline.createInterface({input: process.stdin}).on("line", (line) => {
  if (map === null) {
    map = vm.runInContext("(" + JSON.parse(line) + ")", sandbox);
    return;
  }
  emitted = [];
  map(parse(line));
  process.stdout.write(JSON.stringify(emitted) + "\n");
});
