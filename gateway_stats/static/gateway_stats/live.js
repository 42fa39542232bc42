// The live traffic page: fills #live-events from the staff live feed (/ws/events/), newest on top.
// The socket authenticates with the admin session cookie; it reconnects with a growing backoff.
(function () {
  "use strict";

  var BACKOFF_MIN_MS = 1000;
  var BACKOFF_MAX_MS = 30000;
  var BADGES = {
    ok: "bg-green-100 text-green-700 dark:bg-green-500/20 dark:text-green-400",
    client: "bg-orange-100 text-orange-700 dark:bg-orange-500/20 dark:text-orange-400",
    server: "bg-red-100 text-red-700 dark:bg-red-500/20 dark:text-red-400",
    other: "bg-base-500/8 text-base-700 dark:bg-base-500/20 dark:text-base-200",
  };
  var BADGE_BASE = "inline-block font-semibold rounded-default text-[11px] uppercase whitespace-nowrap h-6 leading-6 px-2 ";
  var CELL = "align-middle px-3 py-2 border-t border-base-200 dark:border-base-800";

  function statusKind(status) {
    if (status >= 200 && status < 400) return "ok";
    if (status >= 400 && status < 500) return "client";
    if (status >= 500) return "server";
    return "other";
  }

  function cell(text) {
    var td = document.createElement("td");
    td.className = CELL;
    td.textContent = text;
    return td;
  }

  function badge(status, errorCode) {
    var td = cell("");
    var span = document.createElement("span");
    span.className = BADGE_BASE + BADGES[statusKind(status)];
    span.textContent = String(status);
    if (errorCode) span.title = errorCode;
    td.appendChild(span);
    return td;
  }

  function row(event) {
    var tr = document.createElement("tr");
    tr.className = "live-row";
    tr.dataset.requestId = event.request_id || "";
    var when = new Date(event.started_at * 1000);
    var target = event.model || event.route || event.endpoint || "";
    if (event.model && event.route) target = event.model + " (" + event.route + ")";
    tr.appendChild(cell(when.toLocaleTimeString()));
    tr.appendChild(cell(event.key_prefix || "-"));
    tr.appendChild(cell(event.username || (event.user_id == null ? "-" : String(event.user_id))));
    tr.appendChild(cell(target || "-"));
    tr.appendChild(badge(event.status, event.error_code));
    tr.appendChild(cell(Number(event.latency_ms).toFixed(1) + " ms"));
    tr.appendChild(cell(String(event.total_tokens)));
    tr.appendChild(cell(event.cost));
    return tr;
  }

  function start(root) {
    var body = root.querySelector("#live-events tbody");
    var empty = root.querySelector("#live-empty");
    var state = root.querySelector("#live-state");
    var pause = root.querySelector("#live-pause");
    var maxRows = parseInt(root.dataset.maxRows, 10) || 200;
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var url = scheme + window.location.host + root.dataset.socketPath;
    var paused = false;
    var backoff = BACKOFF_MIN_MS;

    function show(name, text) {
      state.dataset.state = name;
      state.textContent = text || name;
    }

    function add(events) {
      if (paused) return;
      for (var i = 0; i < events.length; i++) body.insertBefore(row(events[i]), body.firstChild);
      while (body.rows.length > maxRows) body.deleteRow(body.rows.length - 1);
      empty.hidden = body.rows.length > 0;
    }

    function connect() {
      show("connecting");
      var socket = new WebSocket(url);
      socket.onopen = function () {
        backoff = BACKOFF_MIN_MS;
        show("live");
      };
      socket.onmessage = function (message) {
        var data = JSON.parse(message.data);
        if (data.topic === "usage") add(data.events);
      };
      socket.onclose = function () {
        show("reconnecting", "reconnecting in " + Math.round(backoff / 1000) + " s");
        window.setTimeout(connect, backoff);
        backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
      };
    }

    pause.addEventListener("click", function () {
      paused = !paused;
      pause.textContent = paused ? "Resume" : "Pause";
      pause.setAttribute("aria-pressed", String(paused));
    });
    connect();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("live-traffic");
    if (root) start(root);
  });
})();
