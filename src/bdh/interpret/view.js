// The BDH viewer: every number comes from the inlined JSON; text is set with textContent only.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("bdh-data").textContent);
  const M = D.meta, NR = D.neurons;
  const L = M.n_layer, N = M.N, n = M.n_head * M.N;
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k);
    return e;
  }
  const fmt = (v, d = 3) => (v === null || v === undefined) ? "–" : Number(v).toPrecision(d);
  const show = (s) => s.replace(/\n/g, "↵").replace(/\t/g, "→");
  const nid = (i) => `h${Math.floor(i / N)}:${i % N}`;
  function table(head, rows) {
    const t = el("table");
    t.append(el("tr", {}, ...head.map((h) => el("th", { text: h }))));
    for (const r of rows) t.append(el("tr", {}, ...r.map((c) =>
      c instanceof Node ? el("td", {}, c) : el("td", { class: typeof c === "number" ? "num" : "", text: String(c) }))));
    return t;
  }
  function neuronLink(i) {
    return el("span", { class: "neuron", "data-neuron": String(i), text: `${i} (${nid(i)})`,
      onclick: () => showNeuron(i) });
  }

  // ------------------------------------------------------------ header and tabs
  $("title").textContent = M.title || "BDH viewer";
  $("meta").textContent = `${M.T} tokens · ${L} layers · ${M.n_head} heads × ${N} neurons` +
    ` (n = ${n}) · d = ${M.D} · neuron statistics over ${M.corpus} (${M.corpus_tokens} tokens)`;
  for (const b of document.querySelectorAll(".tab")) {
    b.addEventListener("click", () => {
      for (const o of document.querySelectorAll(".tab")) o.classList.toggle("active", o === b);
      for (const v of document.querySelectorAll(".view"))
        v.classList.toggle("hidden", v.id !== "view-" + b.dataset.view);
    });
  }

  // ------------------------------------------------------------ the token strip
  const sel = $("colour");
  sel.append(el("option", { value: "surprisal", text: "surprisal (nats)" }));
  for (let l = 0; l < L; l++) sel.append(el("option", { value: "y" + l, text: `y-density, layer ${l}` }));
  const strip = $("strip");
  const spans = D.tokens.map((t, k) => el("span", { class: "tok", "data-t": String(k), text: show(t) }));
  strip.append(...spans);

  function values(mode) {
    if (mode === "surprisal") return D.surprisal;
    const l = Number(mode.slice(1));
    return D.y_count[l].map((c) => c / n);
  }
  function colour() {
    const vs = values(sel.value);
    let hi = 0;
    for (const v of vs) if (v !== null && v > hi) hi = v;
    spans.forEach((s, k) => {
      const v = vs[k], a = (v === null || hi === 0) ? 0 : v / hi;
      s.style.background = `rgba(220, 50, 47, ${(0.85 * a).toFixed(3)})`;
    });
    $("legend").textContent = `white = 0, red = ${fmt(hi)}` + (sel.value === "surprisal" ? " nats" : " of n active");
  }
  sel.addEventListener("change", colour);
  colour();

  const tip = $("tooltip");
  strip.addEventListener("mousemove", (ev) => {
    const t = ev.target.dataset && ev.target.dataset.t;
    if (t === undefined) { tip.classList.add("hidden"); return; }
    const k = Number(t);
    tip.replaceChildren(
      el("div", { text: `token ${k}: ${JSON.stringify(D.tokens[k])}  loss ${fmt(D.surprisal[k])} nats` }),
      el("div", { text: "next: " + D.pred_ids[k].map((p, r) =>
        `${JSON.stringify(D.vocab[p])} ${fmt(D.pred_p[k][r], 2)}`).join(", ") }),
      el("div", { text: "active x/y per layer: " +
        D.x_count.map((c, l) => `${c[k]}/${D.y_count[l][k]}`).join(" · ") }));
    tip.style.left = Math.min(ev.clientX + 12, window.innerWidth - 330) + "px";
    tip.style.top = (ev.clientY + 14) + "px";
    tip.classList.remove("hidden");
  });
  strip.addEventListener("mouseleave", () => tip.classList.add("hidden"));
  strip.addEventListener("click", (ev) => {
    const t = ev.target.dataset && ev.target.dataset.t;
    if (t !== undefined) showToken(Number(t));
  });

  // ------------------------------------------------------------ a token's neurons
  function showToken(k) {
    spans.forEach((s, j) => s.classList.toggle("selected", j === k));
    const p = $("token-panel");
    p.replaceChildren(el("h2", { text: `Token ${k}: ${JSON.stringify(D.tokens[k])}` }),
      el("p", { text: `loss ${fmt(D.surprisal[k])} nats; most likely next: ` +
        D.pred_ids[k].map((q, r) => `${JSON.stringify(D.vocab[q])} (${fmt(D.pred_p[k][r], 2)})`).join(", ") }));
    for (let l = 0; l < L; l++) {
      p.append(el("h3", { text: `Layer ${l}: ${D.x_count[l][k]} x and ${D.y_count[l][k]} y active of ${n}` }));
      const rows = [];
      for (let r = 0; r < D.top.x[l][k].length; r++) {
        const row = [];
        for (const path of ["x", "y"]) {
          const i = D.top[path][l][k][r], v = D.top[path + "_value"][l][k][r];
          if (v > 0) row.push(neuronLink(i), Math.floor(i / N), fmt(NR.freqs[i % N]), fmt(v));
          else row.push("", "", "", "");
        }
        rows.push(row);
      }
      const t = table(["x neuron", "head", "freq", "x", "y neuron", "head", "freq", "y"], rows);
      t.classList.add("token-neurons");
      t.dataset.layer = String(l);
      p.append(t);
    }
  }

  // ------------------------------------------------------------ a neuron's page
  function showNeuron(i) {
    const p = $("neuron-panel"), h = Math.floor(i / N), j = i % N;
    p.replaceChildren(el("h2", { id: "neuron-title", text: `Neuron ${i} (head ${h}, index ${j})` }));
    p.append(el("p", { text: `rotary frequency ${fmt(NR.freqs[j], 4)} rad/token, frequency bucket ` +
      `${NR.freq_bucket[j] + 1} of 4 (1 = slowest); head ${h} of ${M.n_head}` }));
    p.append(el("h3", { text: "Inhibitory-looking? Negative share of its out-edges' weight" }));
    const heads = [...Array(M.n_head).keys()];
    const headMean = (g, hh) => {
      let t = 0;
      for (let k = hh * N; k < (hh + 1) * N; k++) t += NR[`g${g}_negative`][k];
      return t / N;
    };
    const gt = table(["graph", "this neuron", `head ${h} mean`, "every head's mean"],
      ["x", "y"].map((g) => [`G_${g}`, fmt(NR[`g${g}_negative`][i]), fmt(headMean(g, h)),
        heads.map((hh) => `h${hh} ${fmt(headMean(g, hh), 2)}`).join(" · ")]));
    gt.id = "neuron-inhibition";
    p.append(gt);
    p.append(el("h3", { text: `Firing rate over ${M.corpus} (${M.corpus_tokens} tokens)` }));
    const rate = (c) => c / M.corpus_tokens;
    const rows = [];
    for (let l = 0; l < L; l++) rows.push([l, fmt(rate(NR.fire_x[l][i])), fmt(rate(NR.fire_y[l][i]))]);
    const rt = table(["layer", "x > 0", "y > 0"], rows);
    rt.id = "neuron-rates";
    p.append(rt);
    p.append(el("h3", { text: "Top-activating contexts (largest y)" }));
    const ctx = NR.contexts[i];
    if (!ctx.length) p.append(el("p", { class: "hint", text: "y is never positive here." }));
    const ct = table(["y", "layer", "context"], ctx.map(([v, l, a, t, b]) =>
      [fmt(v), l, el("span", { class: "ctx" }, show(a), el("b", { text: show(t) }), show(b))]));
    ct.id = "neuron-contexts";
    p.append(ct);
    p.append(el("h3", { text: "Logit effect (decoder row through lm_head, LayerNorms left out)" }));
    const lt = [];
    for (let r = 0; r < NR.promote[i].length; r++) lt.push([
      JSON.stringify(D.vocab[NR.promote[i][r]]), fmt(NR.promote_value[i][r]),
      JSON.stringify(D.vocab[NR.suppress[i][r]]), fmt(NR.suppress_value[i][r])]);
    const et = table(["promotes", "", "suppresses", ""], lt);
    et.id = "neuron-logits";
    p.append(et);
    for (const g of ["x", "y"]) {
      p.append(el("h3", { text: `Strongest neighbours in G_${g} = D_${g} E` }));
      const nr = [];
      for (let r = 0; r < NR[`g${g}_out`][i].length; r++) nr.push([
        neuronLink(NR[`g${g}_out`][i][r]), fmt(NR[`g${g}_out_value`][i][r]),
        neuronLink(NR[`g${g}_in`][i][r]), fmt(NR[`g${g}_in_value`][i][r])]);
      p.append(table([`${i} → j`, "weight", `j → ${i}`, "weight"], nr));
    }
  }

  // ------------------------------------------------------------ sparsity
  const NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  const COLOURS = ["#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795"];
  function lineChart(series, labels, ylabel) {
    const W = 900, H = 240, pl = 50, pb = 24, T = series[0].length;
    let hi = 0, lo = 0;
    for (const s of series) for (const v of s) if (v !== null) { hi = Math.max(hi, v); lo = Math.min(lo, v); }
    if (hi === lo) hi = lo + 1;
    const yOf = (v) => ((H - pb) * (hi - (v || 0)) / (hi - lo)).toFixed(1);
    const s = svg("svg", { width: W, height: H + 20, viewBox: `0 0 ${W} ${H + 20}` });
    s.append(svg("line", { x1: pl, y1: H - pb, x2: W, y2: H - pb, stroke: "#999" }),
      svg("line", { x1: pl, y1: 0, x2: pl, y2: H - pb, stroke: "#999" }),
      svg("text", { x: 2, y: 12 }, fmt(hi, 2)), svg("text", { x: 2, y: H - pb }, fmt(lo, 2)),
      svg("text", { x: W / 2, y: H - 4 }, "token position"), svg("text", { x: 2, y: H / 2 }, ylabel));
    series.forEach((ser, k) => {
      const pts = ser.map((v, t) => `${(pl + (W - pl) * t / Math.max(1, T - 1)).toFixed(1)},` +
        yOf(v)).join(" ");
      s.append(svg("polyline", { points: pts, fill: "none", stroke: COLOURS[k % 6], "stroke-width": 1 }));
      s.append(svg("text", { x: pl + 10 + 160 * k, y: H + 16, style: `fill:${COLOURS[k % 6]}` }, labels[k]));
    });
    return s;
  }
  (function sparsity() {
    const v = $("view-sparsity");
    const mean = (a) => a.reduce((x, y) => x + y, 0) / a.length;
    v.append(el("h2", { text: "Density of the neurons over the passage" }));
    const rows = [];
    for (let l = 0; l < L; l++) {
      const dx = mean(D.x_count[l]) / n, dy = mean(D.y_count[l]) / n;
      rows.push([l, fmt(dx), fmt(dy), el("span", { class: "bar", style: `width:${Math.round(400 * dy)}px` })]);
    }
    const t = table(["layer", "x density (mean fraction > 0)", "y density", ""], rows);
    t.id = "sparsity-table";
    v.append(t);
    v.append(el("h3", { text: "y density per token, by layer" }));
    v.append(lineChart(D.y_count.map((c) => c.map((x) => x / n)), D.y_count.map((_, l) => `layer ${l}`), "y density"));
  })();

  // ------------------------------------------------------------ synapses
  (function synapses() {
    const v = $("view-synapses");
    v.append(el("h2", { text: "Synapse traces σ(i, j) over the passage" }));
    if (!D.synapses.length) {
      v.append(el("p", { class: "hint", text: "No synapses chosen: give `bdh view --synapse L,H,I,J` (or a synapse search result with --synapses FILE)." }));
      return;
    }
    v.append(lineChart(D.synapses.map((s) => s.trace),
      D.synapses.map((s) => `L${s.layer} h${s.head} σ(${s.i},${s.j})`), "σ"));
    v.append(table(["layer", "head", "i", "j", "σ at the end", "max σ"], D.synapses.map((s) =>
      [s.layer, s.head, s.i, s.j, fmt(s.trace[s.trace.length - 1]), fmt(Math.max(...s.trace))])));
  })();
  window.bdhView = { data: D, showToken, showNeuron };
})();
