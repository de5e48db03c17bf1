/* Stratus dashboard: the little JavaScript the pages use. Everything works
 * without it (server-rendered tables); with it:
 *  - [data-refresh="<json url>"] parts are refreshed every few seconds from
 *    the dashboard's own JSON (its "html" is the same fragment the server
 *    rendered into the page);
 *  - the logs page follows new lines when "Follow" is ticked;
 *  - figure.chart elements are drawn with uPlot from /dashboard/api/charts/.
 * It fetches from the dashboard alone (same origin), never from elsewhere. */
(function () {
  "use strict";
  var body = document.body;
  var every = parseInt(body.getAttribute("data-refresh-ms"), 10) || 3000;
  var chartsBase = body.getAttribute("data-charts-base") || "/dashboard/api/charts/";
  var CHART_EVERY = 15000;
  var PALETTE = ["#1f6feb", "#d1242f", "#1a7f37", "#bf8700", "#8250df", "#0a7ea4", "#cf222e", "#57606a"];

  function getJSON(url) {
    return fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}, cache: "no-store"})
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); throw new Error("signed out"); }
        return r.json().then(function (j) { return {status: r.status, body: j}; });
      });
  }

  /* --- live parts ------------------------------------------------------ */
  function refresh(el, url) {
    if (document.hidden) { return Promise.resolve(); }
    return getJSON(url).then(function (res) {
      if (res.status === 200 && typeof res.body.html === "string") {
        if (el.getAttribute("data-html") !== res.body.html) {
          el.innerHTML = res.body.html;
          el.setAttribute("data-html", res.body.html);
        }
        el.removeAttribute("data-stale");
        el.setAttribute("data-updated", String(Date.now()));
      } else {
        el.setAttribute("data-stale", (res.body && res.body.error) || String(res.status));
      }
    }).catch(function () { el.setAttribute("data-stale", "unreachable"); });
  }

  function poll(el, url) {
    var busy = false;
    return setInterval(function () {
      if (busy) { return; }
      busy = true;
      refresh(el, url).then(function () { busy = false; }, function () { busy = false; });
    }, every);
  }

  Array.prototype.forEach.call(document.querySelectorAll("[data-refresh]"), function (el) {
    poll(el, el.getAttribute("data-refresh"));
  });

  var follow = document.querySelector("[data-follow]");
  var lines = document.getElementById("log-lines");
  if (follow && lines) {
    var timer = null;
    follow.addEventListener("change", function () {
      if (follow.checked && timer === null) {
        refresh(lines, lines.getAttribute("data-refresh-url"));
        timer = poll(lines, lines.getAttribute("data-refresh-url"));
      } else if (!follow.checked && timer !== null) {
        clearInterval(timer);
        timer = null;
      }
    });
  }

  /* --- charts ---------------------------------------------------------- */
  function note(fig, text) {
    var p = fig.querySelector(".chart-note");
    if (p) { p.textContent = text; p.hidden = !text; }
  }

  function draw(fig, data) {
    var plotEl = fig.querySelector(".plot");
    var points = 0;
    data.series.forEach(function (s) { s.values.forEach(function (v) { if (v !== null) { points++; } }); });
    fig.setAttribute("data-points", String(points));
    fig.setAttribute("data-series", String(data.series.length));
    if (!data.series.length || !points) {
      if (fig._plot) { fig._plot.destroy(); fig._plot = null; }
      fig.classList.remove("drawn");
      note(fig, "No data for the last hour yet.");
      return;
    }
    note(fig, "");
    // From a little before the first point on: a platform that started ten
    // minutes ago gets ten minutes of chart, not a sliver at the hour's end.
    var first = data.x.length;
    data.series.forEach(function (s) {
      for (var i = 0; i < s.values.length && i < first; i++) { if (s.values[i] !== null) { first = i; } }
    });
    var from = Math.max(0, Math.min(first - 2, data.x.length - 20));
    var aligned = [data.x.slice(from)].concat(data.series.map(function (s) { return s.values.slice(from); }));
    var key = data.series.map(function (s) { return s.label; }).join("\u0000");
    if (fig._plot && fig._key === key) {
      fig._plot.setData(aligned);
      return;
    }
    if (fig._plot) { fig._plot.destroy(); }
    var width = Math.max(260, plotEl.clientWidth || fig.clientWidth || 400);
    var opts = {
      width: width, height: 200,
      series: [{}].concat(data.series.map(function (s, i) {
        return {label: s.label, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: false,
                value: function (u, v) { return v === null ? "—" : (+v.toPrecision(4)) + " " + data.unit; }};
      })),
      axes: [{}, {label: data.unit, size: 60}],
      scales: {x: {time: true}},
      legend: {live: true}
    };
    fig._plot = new uPlot(opts, aligned, plotEl);
    fig._key = key;
    fig.classList.add("drawn");
  }

  function loadChart(fig) {
    if (typeof uPlot === "undefined") { note(fig, "The chart library did not load."); return; }
    var q = [];
    if (fig.getAttribute("data-tenant")) { q.push("tenant=" + encodeURIComponent(fig.getAttribute("data-tenant"))); }
    if (fig.getAttribute("data-app")) { q.push("app=" + encodeURIComponent(fig.getAttribute("data-app"))); }
    var url = chartsBase + encodeURIComponent(fig.getAttribute("data-chart")) + (q.length ? "?" + q.join("&") : "");
    getJSON(url).then(function (res) {
      if (res.status !== 200) {
        fig.setAttribute("data-error", res.body.error || String(res.status));
        note(fig, "Metrics unavailable: " + (res.body.error || res.status));
        return;
      }
      fig.removeAttribute("data-error");
      draw(fig, res.body);
    }).catch(function (e) { note(fig, "Metrics unavailable: " + e.message); });
  }

  var figs = document.querySelectorAll("figure.chart");
  Array.prototype.forEach.call(figs, function (fig) {
    loadChart(fig);
    setInterval(function () { if (!document.hidden) { loadChart(fig); } }, CHART_EVERY);
  });
  window.addEventListener("resize", function () {
    Array.prototype.forEach.call(figs, function (fig) {
      if (fig._plot) {
        fig._plot.setSize({width: Math.max(260, fig.querySelector(".plot").clientWidth || 400), height: 200});
      }
    });
  });
})();
