// The ordertrail console's only script: the live list of events (server-sent
// events from the same gap-free feed as Subscribe), pause/resume, and a
// refresh of the stats page. Every page works without it.
(function () {
  "use strict";

  var MAX_ROWS = 500;

  function liveEvents() {
    var live = document.getElementById("live");
    var rows = document.getElementById("events");
    if (!live || !rows) {
      return;
    }
    var after = Number(live.dataset.after);
    var filter = live.dataset.filter;
    var paused = false;
    var held = [];

    var button = document.createElement("button");
    button.type = "button";
    button.id = "pause";
    button.textContent = "Pause";
    var heldNote = document.createElement("span");
    heldNote.id = "held";
    live.appendChild(document.createTextNode(" "));
    live.appendChild(button);
    live.appendChild(heldNote);

    function show(sequence, html) {
      if (sequence <= after) {
        return;
      }
      after = sequence;
      var template = document.createElement("template");
      // Rendered and escaped by the server, as the rows of the page itself.
      template.innerHTML = html;
      var row = template.content.firstElementChild;
      if (!row) {
        return;
      }
      row.classList.add("new");
      rows.insertBefore(row, rows.firstChild);
      var empty = document.getElementById("no-events");
      if (empty) {
        empty.remove();
      }
      var head = document.getElementById("head-sequence");
      if (head && Number(head.textContent) < sequence) {
        head.textContent = String(sequence);
      }
      while (rows.children.length > MAX_ROWS) {
        rows.removeChild(rows.lastChild);
      }
    }

    function note() {
      heldNote.textContent = paused ? " " + held.length + " new while paused" : "";
    }

    button.addEventListener("click", function () {
      paused = !paused;
      button.textContent = paused ? "Resume" : "Pause";
      live.classList.toggle("paused", paused);
      if (!paused) {
        held.forEach(function (event) { show(event[0], event[1]); });
        held = [];
      }
      note();
    });

    function connect() {
      var url = "/live?after=" + after + (filter ? "&" + filter : "");
      var source = new EventSource(url);
      source.addEventListener("event", function (message) {
        var sequence = Number(message.lastEventId);
        if (paused) {
          held.push([sequence, message.data]);
          note();
        } else {
          show(sequence, message.data);
        }
      });
      source.onerror = function () {
        // Resume after what was shown (or held), not after the page's start.
        source.close();
        if (held.length) {
          after = Math.max(after, held[held.length - 1][0]);
        }
        window.setTimeout(connect, 1000);
      };
    }
    connect();
  }

  function refreshStats() {
    if (document.getElementById("head") && document.querySelector(".charts")) {
      window.setTimeout(function () { window.location.reload(); }, 5000);
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    liveEvents();
    refreshStats();
  });
})();
