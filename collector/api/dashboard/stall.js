// modtrack dashboard: the hung-job banner. Polls GET /api/v1/jobs/{job}/stall for the job app.js shows
// (state.job) and, while the job is stalled or paused as a whole, shows who holds it, where, for how
// long, who waits, and the stuck rank's Python stack (innermost last).
"use strict";

const STALL_POLL_MS = 2000;

async function refreshStall() {
  const banner = document.getElementById("stall");
  if (!state.job || document.hidden) return;
  let answer = null;
  try {
    answer = await api(`jobs/${encodeURIComponent(state.job)}/stall`);
  } catch (err) {
    answer = null;  // app.js already says when the collector cannot be reached
  }
  if (!answer || !(answer.stalled || answer.paused)) {
    banner.hidden = true;
    banner.dataset.state = "running";
    return;
  }
  renderStall(banner, answer);
}

function renderStall(banner, answer) {
  const stuck = answer.ranks.filter((r) => r.state === "stuck");
  const waiting = answer.ranks.filter((r) => r.state === "waiting").map((r) => r.rank);
  const where = (r) => (r.module ? `${r.module} (${r.phase})` : `${r.phase}, outside every module`);
  const title = document.getElementById("stall-title");
  const detail = document.getElementById("stall-detail");
  const stack = document.getElementById("stall-stack");
  title.replaceChildren();
  if (answer.stalled && stuck.length) {
    const r = stuck[0];
    title.append("Job stalled: ", el("b", { text: `rank ${r.rank}` }), ` on ${r.host} has not moved for ` +
      `${Math.round(r.seconds)} s in ${where(r)}, step ${r.step}`);
    detail.textContent = waiting.length > 1 ? `ranks ${waiting.join(", ")} wait for it`
      : waiting.length ? `rank ${waiting[0]} waits for it` : answer.summary;
    stack.textContent = (r.stack || []).join("\n");
  } else if (answer.stalled) {
    title.append("Job stalled: ", el("b", { text: "every rank waits" }), ` in ${where(answer.ranks[0])}`);
    detail.textContent = answer.summary;
    stack.textContent = (answer.ranks[0].stack || []).join("\n");
  } else {
    const p = answer.paused;
    title.append("Job paused: ", el("b", { text: "every rank" }), ` in ${where(p)}, step ${p.step}, ` +
      `for ${Math.round(p.seconds)} s`);
    detail.textContent = "all ranks stopped in the same place (a checkpoint, an evaluation?): not one stuck rank";
    stack.textContent = (p.stack || []).join("\n");
  }
  banner.dataset.state = answer.stalled ? "stalled" : "paused";
  banner.hidden = false;
}

setInterval(refreshStall, STALL_POLL_MS);
refreshStall();
