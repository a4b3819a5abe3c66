// The review page's script (inlined by readaloud/pipeline/review.py): renders the embedded rows a page
// at a time, filters and sorts them, keeps the reviewer's marks in localStorage and writes them as
// corrections.csv (filename,score). Plain JS, no framework, no network.
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("review-data").textContent);
  var ROWS = DATA.rows, MEMBERS = DATA.members, PAGE_SIZE = 50;
  var state = { task: "", grade: "", mark: "", text: "", sort: "order", page: 0 };
  var marks = loadMarks();
  var shown = ROWS;

  function loadMarks() {
    try {
      var saved = JSON.parse(window.localStorage.getItem(DATA.storageKey) || "{}");
      return saved && typeof saved === "object" ? saved : {};
    } catch (e) {
      console.warn("review: marks cannot be read from localStorage (" + e + "); they last until the page closes");
      return {};
    }
  }

  function saveMarks() {
    try {
      window.localStorage.setItem(DATA.storageKey, JSON.stringify(marks));
    } catch (e) {
      console.warn("review: marks cannot be saved in localStorage (" + e + "); download them before closing");
    }
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) { if (c) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return node;
  }

  function colour(p) {
    if (p === null || p === undefined || !isFinite(p)) return "none";
    return p >= DATA.greenFrom ? "green" : p >= DATA.yellowFrom ? "yellow" : "red";
  }

  function fmt(p, digits) { return p === null || p === undefined ? "-" : Number(p).toFixed(digits || 3); }

  // a word's probability under it: two decimals, or the power of ten of a tiny one (3e-5)
  function fmtWord(p) { return p >= 0.01 ? Number(p).toFixed(2) : p > 0 ? Number(p).toExponential(0) : "0"; }

  function disagreement(row) {
    var ps = row.m.filter(function (v) { return v !== null; });
    return ps.length < 2 ? -1 : Math.max.apply(null, ps) - Math.min.apply(null, ps);
  }

  function markedAgainstScore(row) {
    var m = marks[row.f];
    return m !== undefined && (m === 1) !== (row.s >= 0.5);
  }

  function matches(row) {
    if (state.task && row.t !== state.task) return false;
    if (state.grade && row.g !== state.grade) return false;
    var m = marks[row.f];
    if (state.mark === "marked" && m === undefined) return false;
    if (state.mark === "unmarked" && m !== undefined) return false;
    if (state.mark === "disagree" && !markedAgainstScore(row)) return false;
    if (state.text) {
      var needle = state.text.toLowerCase();
      if (row.f.toLowerCase().indexOf(needle) < 0 && row.x.toLowerCase().indexOf(needle) < 0
          && (row.h || "").toLowerCase().indexOf(needle) < 0) return false;
    }
    return true;
  }

  var SORTS = {
    order: function (a, b) { return a.i - b.i; },
    "score-asc": function (a, b) { return a.s - b.s || a.i - b.i; },
    "score-desc": function (a, b) { return b.s - a.s || a.i - b.i; },
    unsure: function (a, b) { return Math.abs(a.s - 0.5) - Math.abs(b.s - 0.5) || a.i - b.i; },
    disagree: function (a, b) { return disagreement(b) - disagreement(a) || a.i - b.i; },
    logloss: function (a, b) { return (b.ll === undefined ? -1 : b.ll) - (a.ll === undefined ? -1 : a.ll) || a.i - b.i; }
  };

  function refilter() {
    shown = ROWS.filter(matches).sort(SORTS[state.sort] || SORTS.order);
    var pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
    state.page = Math.min(state.page, pages - 1);
    render();
  }

  function setMark(row, value) {
    if (value === null) delete marks[row.f]; else marks[row.f] = value;
    saveMarks();
    render();
  }

  function wordsOf(row) {
    var box = el("div", { cls: "words", "aria-label": "expected words" });
    if (!row.w.length) {
      row.x.split(/\s+/).filter(Boolean).forEach(function (word) {
        box.appendChild(el("span", { cls: "w none", title: "no probability for this row" }, [word]));
      });
      return box;
    }
    row.w.forEach(function (pair, k) {
      var least = k === row.lo;
      var span = el("span", { cls: "w " + colour(pair[1]) + (least ? " least" : ""), "data-p": String(pair[1]),
                              title: "p = " + pair[1] + (least ? " (least likely word)" : "") },
                    [pair[0], el("small", { text: fmtWord(pair[1]) })]);
      box.appendChild(span);
    });
    return box;
  }

  function rowView(row) {
    var m = marks[row.f];
    var node = el("article", { cls: "row" + (m === undefined ? "" : " marked-" + m), "data-filename": row.f });
    var head = el("div", { cls: "head" }, [
      el("span", { cls: "name", text: row.f }),
      el("span", { cls: "tag task", text: row.t || "(no task)" }),
      el("span", { cls: "tag grade", text: "grade " + (row.g || "?") }),
      el("span", { cls: "score" }, ["ensemble ", el("b", { cls: "ensemble", text: fmt(row.s) })])
    ]);
    if (MEMBERS.length) {
      head.appendChild(el("span", { cls: "members" }, MEMBERS.map(function (name, k) {
        return el("span", { cls: "member", "data-member": name, text: name + " " + fmt(row.m[k]) + " " });
      })));
    }
    if (row.y !== undefined) {
      head.appendChild(el("span", { cls: "truth", text: "label " + row.y + " \u00b7 log loss " + fmt(row.ll) }));
    }
    var marksBox = el("span", { cls: "marks" }, [
      el("button", { type: "button", cls: "mark-1" + (m === 1 ? " on" : ""), title: "the child's response is correct: score 1" }, ["correct (1)"]),
      el("button", { type: "button", cls: "mark-0" + (m === 0 ? " on" : ""), title: "the child's response is wrong: score 0" }, ["wrong (0)"]),
      el("button", { type: "button", cls: "mark-clear", title: "forget this row's mark" }, ["clear"])
    ]);
    marksBox.children[0].addEventListener("click", function () { setMark(row, 1); });
    marksBox.children[1].addEventListener("click", function () { setMark(row, 0); });
    marksBox.children[2].addEventListener("click", function () { setMark(row, null); });
    head.appendChild(marksBox);
    node.appendChild(head);
    var audio = el("audio", { controls: "", preload: "none", src: row.a });
    var heard = el("div", { cls: "heard" }, ["heard: ", el("q", { text: row.h || "" })]);
    node.appendChild(el("div", { cls: "body" }, [audio, wordsOf(row), row.w.length ? heard : null]));
    if (row.n) node.appendChild(el("div", { cls: "note", text: row.n }));
    return node;
  }

  function pager(nav) {
    nav.textContent = "";
    var pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
    var first = shown.length ? state.page * PAGE_SIZE + 1 : 0;
    var last = Math.min(shown.length, (state.page + 1) * PAGE_SIZE);
    var prev = el("button", { type: "button", cls: "prev" }, ["\u2039 previous"]);
    var next = el("button", { type: "button", cls: "next" }, ["next \u203a"]);
    prev.disabled = state.page === 0;
    next.disabled = state.page >= pages - 1;
    prev.addEventListener("click", function () { state.page -= 1; render(); window.scrollTo(0, 0); });
    next.addEventListener("click", function () { state.page += 1; render(); window.scrollTo(0, 0); });
    var jump = el("input", { type: "number", min: "1", max: String(pages), value: String(state.page + 1), "aria-label": "page" });
    jump.addEventListener("change", function () {
      var p = parseInt(jump.value, 10);
      if (p >= 1 && p <= pages) { state.page = p - 1; render(); }
    });
    nav.appendChild(prev);
    nav.appendChild(el("span", { cls: "where", text: "rows " + first + "\u2013" + last + " of " + shown.length +
                                 (shown.length === ROWS.length ? "" : " (of " + ROWS.length + ")") + " \u00b7 page " }));
    nav.appendChild(jump);
    nav.appendChild(el("span", { text: " of " + pages }));
    nav.appendChild(next);
  }

  function render() {
    var main = document.getElementById("rows");
    main.textContent = "";
    var part = shown.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE);
    if (!part.length) main.appendChild(el("p", { cls: "empty", text: "No row matches the filters." }));
    var frag = document.createDocumentFragment();
    part.forEach(function (row) { frag.appendChild(rowView(row)); });
    main.appendChild(frag);
    pager(document.getElementById("pager-top"));
    pager(document.getElementById("pager-bottom"));
    var names = Object.keys(marks);
    var against = ROWS.filter(markedAgainstScore).length;
    document.getElementById("mark-count").textContent = names.length + " row(s) marked, " + against +
      " of them against the ensemble's score (score \u2265 0.5 means correct)";
  }

  function csvField(s) { return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }

  // The corrections as train_labels.csv rows (filename,score), in submission order.
  function correctionsCsv() {
    var lines = ["filename,score"];
    ROWS.forEach(function (row) {
      if (marks[row.f] !== undefined) lines.push(csvField(row.f) + "," + marks[row.f]);
    });
    return lines.join("\n") + "\n";
  }

  function download() {
    var blob = new Blob([correctionsCsv()], { type: "text/csv" });
    var link = el("a", { href: URL.createObjectURL(blob), download: "corrections.csv" });
    document.body.appendChild(link);
    link.click();
    setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
  }

  function fillSelect(id, values) {
    var select = document.getElementById(id);
    values.forEach(function (v) { select.appendChild(el("option", { value: v, text: v || "(none)" })); });
  }

  function distinct(key) {
    var seen = {};
    ROWS.forEach(function (r) { seen[r[key]] = true; });
    return Object.keys(seen).sort();
  }

  function bind(id, key, event) {
    document.getElementById(id).addEventListener(event || "change", function (e) {
      state[key] = e.target.value;
      state.page = 0;
      refilter();
    });
  }

  fillSelect("filter-task", distinct("t"));
  fillSelect("filter-grade", distinct("g"));
  if (!ROWS.some(function (r) { return r.ll !== undefined; })) {
    document.querySelector('#sort option[value="logloss"]').remove();
  }
  if (MEMBERS.length < 2) document.querySelector('#sort option[value="disagree"]').remove();
  bind("filter-task", "task");
  bind("filter-grade", "grade");
  bind("filter-mark", "mark");
  bind("filter-text", "text", "input");
  bind("sort", "sort");
  document.getElementById("download").addEventListener("click", download);
  document.getElementById("clear-marks").addEventListener("click", function () {
    if (window.confirm("Forget every mark of this page?")) { marks = {}; saveMarks(); refilter(); }
  });
  window.correctionsCsv = correctionsCsv;
  window.review = { rows: ROWS, members: MEMBERS, marks: function () { return marks; }, state: state,
                    shown: function () { return shown; }, refilter: refilter };
  refilter();
})();
