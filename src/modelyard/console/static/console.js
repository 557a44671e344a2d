// The console's only script of its own (the CSP allows no inline script and no eval).
// Copy buttons, and the playground: it calls the public /v1 API with the pasted key and
// streams the answer in; text goes in with textContent, never as HTML.
(function () {
  "use strict";

  document.addEventListener("click", function (ev) {
    var button = ev.target.closest("[data-copy]");
    if (!button) return;
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source) return;
    var text = source.textContent;
    var done = function () { button.textContent = "Copied"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { selectText(source); });
    } else {
      selectText(source);
    }
  });

  function selectText(node) {
    var range = document.createRange();
    range.selectNodeContents(node);
    var sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  function field(form, name) {
    var el = form.elements[name];
    if (!el) return "";
    if (el.length !== undefined && el.tagName === undefined) {      // a radio group
      for (var i = 0; i < el.length; i++) if (el[i].checked) return el[i].value;
      return "";
    }
    return (el.value || "").trim();
  }

  // The request body the form describes; a bad number stops here with the field named.
  function buildRequest(form) {
    var mode = field(form, "mode") || "chat";
    if (mode === "embeddings") {
      return { mode: mode, path: "/embeddings", body: { model: field(form, "model"), input: form.elements.prompt.value } };
    }
    var body = { model: field(form, "model"), stream: true, stream_options: { include_usage: true } };
    var prompt = form.elements.prompt.value;
    if (mode === "chat") {
      var messages = [];
      var system = form.elements.system.value.trim();
      if (system) messages.push({ role: "system", content: system });
      messages.push({ role: "user", content: prompt });
      body.messages = messages;
    } else {
      body.prompt = prompt;
    }
    var numbers = [["temperature", parseFloat, false], ["max_tokens", parseInt, true], ["seed", parseInt, true]];
    for (var i = 0; i < numbers.length; i++) {
      var name = numbers[i][0], raw = field(form, name);
      if (raw === "") continue;
      var value = numbers[i][1](raw, 10);
      if (isNaN(value) || (numbers[i][2] && String(value) !== raw)) {
        throw new Error(name + " must be a" + (numbers[i][2] ? " whole" : "") + " number, got " + JSON.stringify(raw));
      }
      body[name] = value;
    }
    var stop = field(form, "stop");
    if (stop) body.stop = stop.split(",").map(function (s) { return s.trim(); }).filter(Boolean);
    var format = field(form, "response_format");
    if (format === "json_object") body.response_format = { type: "json_object" };
    if (format === "json_schema") {
      var schema;
      try { schema = JSON.parse(form.elements.schema.value || "{}"); } catch (e) {
        throw new Error("the JSON schema is not JSON: " + e.message);
      }
      body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: schema } };
    }
    return { mode: mode, path: mode === "chat" ? "/chat/completions" : "/completions", body: body };
  }

  function snippets(form) {
    var req;
    try { req = buildRequest(form); } catch (e) { return; }
    var base = window.location.origin + form.getAttribute("data-api");
    var json = JSON.stringify(req.body, null, 2);
    document.getElementById("pg-curl").textContent =
      "curl -N " + base + req.path + " \\\n  -H \"Authorization: Bearer $MODELYARD_API_KEY\" \\\n" +
      "  -H 'Content-Type: application/json' \\\n  -d '" + json.replace(/'/g, "'\\''") + "'";
    var args = [];
    Object.keys(req.body).forEach(function (k) {
      args.push("    " + k + "=" + pyRepr(req.body[k]) + ",");
    });
    if (req.mode === "embeddings") {
      document.getElementById("pg-python").textContent =
        "import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url=" + pyRepr(base) +
        ", api_key=os.environ[\"MODELYARD_API_KEY\"])\nresult = client.embeddings.create(\n" + args.join("\n") +
        "\n)\nprint(len(result.data[0].embedding), result.usage)\n";
      return;
    }
    var call = req.mode === "chat" ? "client.chat.completions.create" : "client.completions.create";
    var read = req.mode === "chat" ? "chunk.choices[0].delta.content or \"\"" : "chunk.choices[0].text";
    document.getElementById("pg-python").textContent =
      "import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url=" + pyRepr(base) +
      ", api_key=os.environ[\"MODELYARD_API_KEY\"])\nstream = " + call + "(\n" + args.join("\n") +
      "\n)\nfor chunk in stream:\n    if chunk.choices:\n        print(" + read + ", end=\"\", flush=True)\n";
  }

  function pyRepr(v) {
    if (v === true) return "True";
    if (v === false) return "False";
    if (v === null) return "None";
    if (Array.isArray(v)) return "[" + v.map(pyRepr).join(", ") + "]";
    if (typeof v === "object") {
      return "{" + Object.keys(v).map(function (k) { return JSON.stringify(k) + ": " + pyRepr(v[k]); }).join(", ") + "}";
    }
    return JSON.stringify(v);
  }

  var controller = null;

  async function send(form) {
    var out = document.getElementById("pg-output");
    var stats = document.getElementById("pg-stats");
    var key = document.getElementById("pg-key").value.trim();
    var req;
    try { req = buildRequest(form); } catch (e) {
      stats.textContent = "Not sent: " + e.message; stats.setAttribute("data-state", "error"); return;
    }
    if (!key) { stats.textContent = "Not sent: paste an inference API key (or make one)."; stats.setAttribute("data-state", "error"); return; }
    out.textContent = "";
    stats.textContent = "Sending…"; stats.setAttribute("data-state", "streaming");
    controller = new AbortController();
    document.getElementById("pg-stop").disabled = false;
    var started = performance.now(), first = null, usage = null, finish = null, failed = null;
    try {
      var resp = await fetch(form.getAttribute("data-api") + req.path, {
        method: "POST", signal: controller.signal, credentials: "omit",
        headers: { "Authorization": "Bearer " + key, "Content-Type": "application/json" },
        body: JSON.stringify(req.body)
      });
      if (!resp.ok) {
        var text = await resp.text(), message = text;
        try { var j = JSON.parse(text); message = (j.error && j.error.message) || JSON.stringify(j.detail || j); } catch (e) {}
        throw new Error("HTTP " + resp.status + ": " + message);
      }
      if (req.mode === "embeddings") {
        var result = await resp.json(), vector = result.data[0].embedding;
        out.textContent = result.data.length + " vector(s) of " + vector.length + " dimensions; the first values: " +
          vector.slice(0, 8).map(function (x) { return x.toFixed(4); }).join(", ") + " …";
        stats.textContent = "Done. total " + Math.round(performance.now() - started) + " ms; usage: " +
          result.usage.prompt_tokens + " prompt tokens.";
        stats.setAttribute("data-state", "done");
        return;
      }
      var reader = resp.body.getReader(), decoder = new TextDecoder(), buffer = "";
      for (;;) {
        var part = await reader.read();
        if (part.done) break;
        buffer += decoder.decode(part.value, { stream: true });
        var events = buffer.split("\n\n");
        buffer = events.pop();
        for (var i = 0; i < events.length; i++) {
          var lines = events[i].split("\n");
          for (var l = 0; l < lines.length; l++) {
            if (lines[l].indexOf("data: ") !== 0) continue;
            var data = lines[l].slice(6);
            if (data === "[DONE]") continue;
            var chunk = JSON.parse(data);
            if (chunk.error) { failed = chunk.error.message || JSON.stringify(chunk.error); continue; }
            if (chunk.usage) usage = chunk.usage;
            var choice = chunk.choices && chunk.choices[0];
            if (!choice) continue;
            var piece = req.mode === "chat" ? (choice.delta && choice.delta.content) : choice.text;
            if (piece) {
              if (first === null) first = performance.now();
              out.textContent += piece;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
      var total = performance.now() - started;
      var words = [failed ? "Ended with an error: " + failed + "." : "Done.",
        "finish_reason " + (finish || "none") + ";",
        "time to first token " + (first === null ? "–" : Math.round(first - started) + " ms") + ";",
        "total " + Math.round(total) + " ms;"];
      if (usage) words.push("usage: " + usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion = " + usage.total_tokens + " tokens.");
      stats.textContent = words.join(" ");
      stats.setAttribute("data-state", failed ? "error" : "done");
    } catch (e) {
      stats.textContent = (e.name === "AbortError" ? "Stopped." : "Failed: " + e.message);
      stats.setAttribute("data-state", "error");
    } finally {
      controller = null;
      document.getElementById("pg-stop").disabled = true;
    }
  }

  document.addEventListener("submit", function (ev) {
    if (ev.target.id !== "playground") return;
    ev.preventDefault();
    send(ev.target);
  });
  document.addEventListener("click", function (ev) {
    if (ev.target.id === "pg-stop" && controller) controller.abort();
  });
  document.addEventListener("input", function (ev) {
    var form = ev.target.closest && ev.target.closest("#playground");
    if (form) snippets(form);
  });
  document.addEventListener("change", function (ev) {
    var form = ev.target.closest && ev.target.closest("#playground");
    if (form) snippets(form);
  });
  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("playground");
    if (form) snippets(form);
  });
})();
