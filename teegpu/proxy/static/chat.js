"use strict";
// The chat page of teegpu proxy: shows what the proxy verified, and chats only while it holds.
const $ = (id) => document.getElementById(id);
const history = [];
let verified = false;
let busy = false;

const PROTECTION = {
  plain: ["warn", "Privacy mode plain: the GPU server sees this conversation's activations (the hidden " +
          "states derived from your words). The enclave keeps the text, the KV cache and sampling."],
  local: ["ok", "Privacy mode otp: the GPU server sees only activations under fresh one-time pads, " +
          "uniformly random to it; the enclave makes the pads itself."],
  server: ["ok", "Privacy mode otp + pad server: the GPU server sees only padded activations, and a " +
           "second server makes the pads' products. Either server alone learns nothing; the two " +
           "together could, so they must be run by different operators."],
  "server-or-local": ["ok", "Privacy mode otp + pad server, falling back to pads made in the enclave: " +
                      "the GPU server sees only padded activations either way."],
};

function fact(list, name, value) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = name;
  dd.textContent = value ?? "(not given)";
  list.append(dt, dd);
}

function showAttestation(a) {
  const r = a.report || {};
  const facts = $("facts");
  facts.replaceChildren();
  fact(facts, "Upstream", a.upstream);
  fact(facts, "Attestation", r.attestation);
  fact(facts, "Measurement", r.measurement);
  fact(facts, "TCB status", r.tcb_status);
  fact(facts, "TCB info issued", r.tcb_info_date);
  if (r.advisory_ids && r.advisory_ids.length) fact(facts, "Advisories", r.advisory_ids.join(", "));
  fact(facts, "Model SHA-256", r.model_sha256);
  fact(facts, "Privacy", r.privacy === "otp" ? `otp (pads: ${r.pads})` : r.privacy);
  fact(facts, "Last verified", a.verified_at ? new Date(a.verified_at).toLocaleString() : "never");
  const [kind, text] = r.attestation === "none"
    ? ["warn", "NO ATTESTATION: this server presented no quote; nothing vouches that it runs in a TEE."]
    : PROTECTION[r.privacy === "otp" ? r.pads : r.privacy] || ["warn", "Unknown privacy mode."];
  $("protection").className = `note ${kind}`;
  $("protection").textContent = text;
  $("checks").replaceChildren(...(r.checks || []).map((c) => {
    const li = document.createElement("li");
    li.textContent = c;
    return li;
  }));
  verified = a.verified;
  const short = r.measurement ? `${r.measurement.slice(0, 26)}...` : "NO QUOTE";
  $("status").textContent = verified ? `Verified: ${short}, privacy ${r.privacy}` : "NOT verified: sending is blocked";
  $("status").className = `status ${verified ? "ok" : "bad"}`;
  block(verified ? null : `The upstream is not verified: ${a.error || "no verification yet"}`);
}

function block(reason) {
  $("blocked").hidden = !reason;
  $("blocked").textContent = reason || "";
  $("send").disabled = Boolean(reason) || busy || !$("model").value;
}

async function refresh() {
  try {
    const answer = await fetch("/v1/attestation", { cache: "no-store" });
    showAttestation(await answer.json());
  } catch (e) {
    verified = false;
    $("status").textContent = "NOT verified: the proxy does not answer";
    $("status").className = "status bad";
    block(`The proxy does not answer: ${e}`);
  }
  return verified;
}

async function loadModels() {
  const answer = await fetch("/v1/models");
  const body = await answer.json();
  if (!answer.ok) {
    block(`Cannot list the models: ${body.error ? body.error.message : answer.status}`);
    return;
  }
  $("model").replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
  block($("blocked").hidden ? null : $("blocked").textContent);
}

function bubble(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

async function stream(answer, into) {
  const reader = answer.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return text;
    pending += decoder.decode(value, { stream: true });
    const lines = pending.split("\n");
    pending = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const chunk = JSON.parse(line.slice(6));
      if (chunk.error) throw new Error(chunk.error.message);
      text += (chunk.choices[0] && chunk.choices[0].delta.content) || "";
      into.textContent = text;
    }
  }
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || !(await refresh())) return;
  busy = true;
  $("chat").setAttribute("aria-busy", "true");
  block(null);
  history.push({ role: "user", content: prompt });
  bubble("user", prompt);
  $("prompt").value = "";
  const into = bubble("assistant", "");
  try {
    const answer = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: $("model").value, messages: history, stream: true }),
    });
    if (!answer.ok) {
      const body = await answer.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${answer.status}`);
    }
    history.push({ role: "assistant", content: await stream(answer, into) });
  } catch (e) {
    history.pop();
    into.className = "error";
    into.textContent = `Not answered: ${e.message}`;
  } finally {
    busy = false;
    await refresh();
    $("chat").setAttribute("aria-busy", "false");
  }
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) $("composer").requestSubmit();
});
refresh().then(loadModels);
setInterval(refresh, 15000);
