// The admin Playground: send one chat message with a chosen key through the real proxy, stream the answer,
// show its tokens and the cost the ledger recorded. Keys are stored as digests, so the page first gets a
// short-lived playground token for the key from the admin (POST with the session and its CSRF token), then
// calls the proxy with it as a Bearer credential, like any OpenAI client.
(function () {
  "use strict";

  function byId(id) {
    return document.getElementById(id);
  }

  function sleep(ms) {
    return new Promise(function (resolve) {
      setTimeout(resolve, ms);
    });
  }

  // The message of an error answer: the proxy's {"error": {"message"}} or the admin's {"detail"}.
  async function errorMessage(response) {
    var text = await response.text();
    try {
      var body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message;
      if (body && body.detail) return body.detail;
    } catch (ignored) {
      // not JSON: fall through to the status line
    }
    return "HTTP " + response.status + (text ? ": " + text.slice(0, 300) : "");
  }

  function start() {
    var root = byId("playground");
    var form = byId("playground-form");
    if (!root || !form) return;
    var keySelect = byId("playground-key");
    var modelSelect = byId("playground-model");
    var message = byId("playground-message");
    var send = byId("playground-send");
    var answer = byId("playground-answer");
    var usage = byId("playground-usage");
    var errorBox = byId("playground-error");
    var state = byId("playground-state");
    var requestLine = byId("playground-request");
    var noModels = byId("playground-no-models");
    var keyModels = JSON.parse(byId("playground-key-models").textContent);
    var csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
    var usageTries = parseInt(root.dataset.usageTries, 10) || 10;
    var usageInterval = parseInt(root.dataset.usageIntervalMs, 10) || 500;

    function showModels() {
      var models = keyModels[keySelect.value] || [];
      var previous = modelSelect.value;
      modelSelect.replaceChildren();
      models.forEach(function (name) {
        var option = document.createElement("option");
        option.value = name;
        option.textContent = name;
        modelSelect.appendChild(option);
      });
      if (models.indexOf(previous) >= 0) modelSelect.value = previous;
      noModels.hidden = models.length > 0;
      send.disabled = models.length === 0;
    }

    function showError(text) {
      errorBox.textContent = text;
      errorBox.hidden = false;
    }

    function showUsage(values) {
      usage.querySelectorAll("[data-usage]").forEach(function (cell) {
        var value = values[cell.dataset.usage];
        if (value !== undefined && value !== null) cell.textContent = String(value);
      });
    }

    function reset() {
      answer.textContent = "";
      errorBox.hidden = true;
      errorBox.textContent = "";
      requestLine.textContent = "";
      usage.querySelectorAll("[data-usage]").forEach(function (cell) {
        cell.textContent = "-";
      });
    }

    async function token(keyId) {
      var body = new FormData();
      body.append("key", keyId);
      var response = await fetch(root.dataset.tokenUrl, {
        method: "POST",
        body: body,
        credentials: "same-origin",
        headers: { "X-CSRFToken": csrf },
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      return (await response.json()).token;
    }

    // Reads the SSE stream: appends each delta's content, shows the usage chunk, reports an error event.
    async function readStream(response) {
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      for (;;) {
        var part = await reader.read();
        if (part.done) break;
        buffer += decoder.decode(part.value, { stream: true });
        var events = buffer.split(/\r?\n\r?\n/);
        buffer = events.pop();
        for (var i = 0; i < events.length; i++) {
          var lines = events[i].split(/\r?\n/);
          for (var j = 0; j < lines.length; j++) {
            var line = lines[j];
            if (line.indexOf("data:") !== 0) continue;
            var data = line.slice(5).trim();
            if (data === "[DONE]") return;
            var chunk;
            try {
              chunk = JSON.parse(data);
            } catch (ignored) {
              continue;
            }
            if (chunk.error) {
              showError(chunk.error.message || JSON.stringify(chunk.error));
              continue;
            }
            var choice = chunk.choices && chunk.choices[0];
            if (choice && choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
            if (chunk.usage) showUsage(chunk.usage);
          }
        }
      }
    }

    // The ledger's row for the call (its write trails the answer): a few bounded tries.
    async function recordedUsage(requestId) {
      var url = root.dataset.usageUrl + "?request_id=" + encodeURIComponent(requestId);
      for (var attempt = 0; attempt < usageTries; attempt++) {
        var response = await fetch(url, { credentials: "same-origin" });
        if (response.ok) return response.json();
        if (response.status !== 404) return null;
        await sleep(usageInterval);
      }
      return null;
    }

    async function submit(event) {
      event.preventDefault();
      var content = message.value.trim();
      if (!content) {
        showError("Write a message first.");
        return;
      }
      if (!modelSelect.value) {
        showError("This key may call no active model.");
        return;
      }
      reset();
      send.disabled = true;
      state.textContent = "Sending…";
      try {
        var bearer = await token(keySelect.value);
        var response = await fetch(root.dataset.chatPath, {
          method: "POST",
          credentials: "omit",
          headers: { Authorization: "Bearer " + bearer, "Content-Type": "application/json" },
          body: JSON.stringify({
            model: modelSelect.value,
            messages: [{ role: "user", content: content }],
            stream: true,
            stream_options: { include_usage: true },
          }),
        });
        var requestId = response.headers.get("x-request-id");
        if (requestId) requestLine.textContent = "Request id: " + requestId;
        if (!response.ok) {
          // An error answer (budget, rate limit, scope, upstream failure...) carries no usage: no cost to wait for.
          showError(response.status + ": " + (await errorMessage(response)));
          state.textContent = "";
          return;
        }
        state.textContent = "Streaming…";
        await readStream(response);
        if (requestId) {
          state.textContent = "Waiting for the ledger…";
          var recorded = await recordedUsage(requestId);
          if (recorded) {
            showUsage(recorded);
          } else {
            usage.querySelector("[data-usage=cost]").textContent = "not recorded yet (see the request log)";
          }
        }
        state.textContent = "";
      } catch (error) {
        showError(error.message || String(error));
        state.textContent = "";
      } finally {
        send.disabled = !modelSelect.value;
      }
    }

    keySelect.addEventListener("change", showModels);
    form.addEventListener("submit", submit);
    showModels();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
