/* Tidy the y-axis numbers of Unfold's charts: its tick callback prints Chart.js's raw float steps, so a small
   cost axis read "0.000024999999999999998". Once Unfold has drawn its charts (after window load, polled for a
   few seconds), each tick is rounded to six significant digits before Unfold's own callback adds its suffix. */
(function () {
  "use strict";

  var TRIES = 30;
  var EVERY_MS = 100;

  function tidy(value) {
    return typeof value === "number" ? Number(value.toPrecision(6)) : value;
  }

  var patched = new WeakSet();  // Chart.js's option proxies refuse unknown properties: no marker on them

  function patch(chart) {
    var scales = chart.config.options && chart.config.options.scales;
    var ticks = scales && scales.y && scales.y.ticks;
    if (!ticks || patched.has(chart)) return;
    patched.add(chart);
    var original = ticks.callback;
    ticks.callback = function (value, index, all) {
      var shown = tidy(value);
      return typeof original === "function" ? original.call(this, shown, index, all) : shown;
    };
    chart.update("none");
  }

  // Chart.js may be a global binding of Unfold's bundle rather than a property of window.
  function chartJs() {
    /* global Chart */
    return typeof Chart !== "undefined" ? Chart : window.Chart;
  }

  function run(triesLeft) {
    var canvases = document.querySelectorAll("canvas.chart");
    var drawn = 0;
    var library = chartJs();
    if (library && library.getChart) {
      canvases.forEach(function (canvas) {
        var chart = library.getChart(canvas);
        if (chart) {
          patch(chart);
          drawn += 1;
        }
      });
    }
    if (drawn < canvases.length && triesLeft > 0) {
      window.setTimeout(function () { run(triesLeft - 1); }, EVERY_MS);
    }
  }

  window.addEventListener("load", function () {
    run(TRIES);
  });
})();
