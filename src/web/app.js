// The live page: a user's rows and tastes, answered by the engine's local
// state (GET /api/users/{id}/...), kept fresh by server-sent events fed by the
// output topics, with likes, ratings and plays sent to POST /api/track.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = {
  user: null,
  token: sessionStorage.getItem("recstream.token") || "",
  tmdbKey: localStorage.getItem("recstream.tmdbKey") || "",
  versions: { carousels: -1, insights: -1 },
  events: null,
  sentAt: null,
  posters: new Map(),
};

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("token")) {
    state.token = params.get("token");
    sessionStorage.setItem("recstream.token", state.token);
    params.delete("token");
  }
  if (params.get("tmdb")) {
    state.tmdbKey = params.get("tmdb");
    localStorage.setItem("recstream.tmdbKey", state.tmdbKey);
    params.delete("tmdb");
  }
  // The token stays out of the address bar (and out of shared links).
  history.replaceState(null, "", params.toString() ? "#" + params.toString() : location.pathname);
  return params.get("user");
}

function userPath(user, rest) {
  return `api/users/${encodeURIComponent(user)}/${rest}`;
}

function showWrites() {
  $("#writes").textContent = state.token ? "writes on" : "read-only: add the API token (⚙)";
}

function setLive(live) {
  const dot = $("#connection");
  dot.classList.toggle("live", live);
  dot.textContent = live ? "live" : "reconnecting";
}

async function getJson(path) {
  const response = await fetch(path, { headers: { accept: "application/json" } });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function refetch() {
  const user = state.user;
  try {
    const [carousels, insights] = await Promise.all([
      getJson(userPath(user, "carousels")),
      getJson(userPath(user, "insights")),
    ]);
    if (user !== state.user) return;
    renderCarousels(carousels);
    renderInsights(insights);
  } catch (e) {
    $("#last-update").textContent = `could not load ${user}: ${e.message}`;
  }
}

function openUser(user) {
  if (!user) return;
  state.user = user;
  state.versions = { carousels: -1, insights: -1 };
  $("#user-input").value = user;
  const params = new URLSearchParams(location.hash.slice(1));
  params.set("user", user);
  history.replaceState(null, "", "#" + params.toString());
  if (state.events) state.events.close();
  setLive(false);
  const events = new EventSource(userPath(user, "stream"));
  state.events = events;
  // `ready` comes once the feed reads from the end of the output topics, so
  // reading the current rows after it misses nothing.
  events.addEventListener("ready", () => { setLive(true); refetch(); });
  events.addEventListener("resync", () => refetch());
  events.addEventListener("carousels", (e) => renderCarousels(JSON.parse(e.data)));
  events.addEventListener("insights", (e) => renderInsights(JSON.parse(e.data)));
  events.onerror = () => setLive(false);
}

function isNewer(kind, record) {
  if (record.user_id !== state.user || record.version < state.versions[kind]) return false;
  state.versions[kind] = record.version;
  return true;
}

function hue(text) {
  let h = 0;
  for (const c of text) h = (h * 31 + c.charCodeAt(0)) % 360;
  return h;
}

function initials(title) {
  return title.replace(/\(.*?\)/g, "").split(/\s+/).filter((w) => /^[\p{L}\p{N}]/u.test(w))
    .slice(0, 2).map((w) => w[0].toUpperCase()).join("");
}

function poster(item) {
  const div = document.createElement("div");
  div.className = "poster";
  const h = hue(item.genres[0] || item.title);
  div.style.background = `linear-gradient(160deg, hsl(${h} 45% 32%), hsl(${(h + 40) % 360} 35% 14%))`;
  const big = document.createElement("span");
  big.className = "initials";
  big.textContent = initials(item.title);
  div.append(big);
  const label = document.createElement("span");
  label.textContent = item.genres.join(" · ");
  div.append(label);
  if (item.tmdb_id && state.tmdbKey) attachPoster(div, item.tmdb_id);
  return div;
}

// Posters need TMDb's API (a key, and a browser that can reach it); without
// either, the placeholder stays.
async function attachPoster(div, tmdbId) {
  let url = state.posters.get(tmdbId);
  if (url === undefined) {
    try {
      const info = await getJson(`https://api.themoviedb.org/3/movie/${tmdbId}?api_key=${encodeURIComponent(state.tmdbKey)}`);
      url = info.poster_path ? `https://image.tmdb.org/t/p/w185${info.poster_path}` : null;
    } catch (_) {
      url = null;
    }
    state.posters.set(tmdbId, url);
  }
  if (!url) return;
  const img = document.createElement("img");
  img.alt = "";
  img.loading = "lazy";
  img.onerror = () => img.remove();
  img.src = url;
  div.prepend(img);
}

function card(item, row, position) {
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.movieId = item.movie_id;
  el.dataset.genreList = `|${item.genres.join("|")}|`;
  el.append(poster(item));
  const info = document.createElement("div");
  info.className = "info";
  const title = document.createElement("span");
  title.className = "title";
  title.textContent = item.title;
  info.append(title);
  info.append(document.createTextNode([item.year, item.genres.join(", ")].filter(Boolean).join(" · ")));
  const why = document.createElement("div");
  why.className = "why";
  why.textContent = item.reason;
  info.append(why);
  el.append(info);
  const actions = document.createElement("div");
  actions.className = "actions";
  const button = (cls, label, title, type, value) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = cls;
    b.textContent = label;
    b.title = title;
    b.onclick = () => track(el, item, row, position, type, value);
    actions.append(b);
  };
  button("like", "♥", "Like", "like");
  button("dislike", "✗", "Dislike", "dislike");
  button("play", "▶", "Play", "play", 60);
  const rate = document.createElement("select");
  rate.className = "rate";
  rate.title = "Rate";
  rate.innerHTML = '<option value="">★</option>' + [5, 4, 3, 2, 1].map((v) => `<option value="${v}">${v}★</option>`).join("");
  rate.onchange = () => rate.value && track(el, item, row, position, "rate", Number(rate.value));
  actions.append(rate);
  el.append(actions);
  return el;
}

function renderCarousels(record) {
  if (!isNewer("carousels", record)) return;
  const rows = $("#rows");
  rows.replaceChildren();
  if (record.cold_start) {
    const note = document.createElement("p");
    note.className = "cold";
    note.dataset.testid = "cold-start";
    note.textContent = "New user: these are cold-start rows (popular and trending) until the first interaction.";
    rows.append(note);
  }
  // v2 describes each item once; rows hold movie ids.
  const byId = new Map(record.items.map((item) => [item.movie_id, item]));
  for (const row of record.rows) {
    const section = document.createElement("section");
    section.className = "row";
    section.dataset.rowId = row.id;
    section.dataset.kind = row.kind;
    const h = document.createElement("h2");
    h.textContent = row.title;
    const kind = document.createElement("span");
    kind.className = "kind muted";
    kind.textContent = row.kind.replace(/_/g, " ");
    h.append(kind);
    const cards = document.createElement("div");
    cards.className = "cards";
    row.movie_ids.forEach((id, i) => cards.append(card(byId.get(id), row.id, i)));
    section.append(h, cards);
    rows.append(section);
  }
  if (state.sentAt !== null) {
    $("#last-update").textContent = `rows updated ${Math.round(performance.now() - state.sentAt)} ms after your action (version ${record.version})`;
    state.sentAt = null;
  } else {
    $("#last-update").textContent = `rows at version ${record.version}`;
  }
}

function renderInsights(record) {
  if (!isNewer("insights", record)) return;
  const bars = $("#genre-bars");
  bars.replaceChildren();
  const maxAbs = Math.max(1e-9, ...record.genres.map((g) => Math.abs(g.weight)));
  for (const g of record.genres) {
    const bar = document.createElement("div");
    bar.className = "bar" + (g.weight < 0 ? " negative" : "");
    bar.dataset.genre = g.genre;
    const fill = Math.round((100 * Math.abs(g.weight)) / maxAbs);
    bar.innerHTML = `<span></span><span class="track"><span class="fill" style="width:${fill}%; display:block"></span></span><span></span>`;
    bar.children[0].textContent = g.genre;
    bar.children[2].textContent = g.weight < 0 ? "−" : `${Math.round(100 * g.share)}%`;
    bars.append(bar);
  }
  if (!record.genres.length) bars.textContent = "No tastes yet.";
  const a = record.activity, e = record.engagement;
  const facts = [
    ["events", a.events_total],
    ["by type", Object.entries(a.by_type).map(([k, v]) => `${k} ${v}`).join(", ") || "—"],
    ["titles seen", a.items_seen],
    ["ratings", a.ratings + (a.mean_rating ? ` (mean ${a.mean_rating.toFixed(2)})` : "")],
    ["plays", `${e.plays} (${Math.round(100 * e.completion_rate)}% completed)`],
    ["carousel CTR", `${(100 * e.ctr).toFixed(1)}%`],
  ];
  const dl = $("#activity");
  dl.replaceChildren();
  for (const [k, v] of facts) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
  $("#meta").textContent = `variant ${record.variant} · version ${record.version}` +
    (record.as_of ? ` · as of ${new Date(record.as_of).toISOString().replace("T", " ").slice(0, 19)}` : "");
}

async function track(el, item, row, position, type, value) {
  if (!state.token) {
    $("#last-update").textContent = "read-only: add the API token (⚙) to send interactions";
    return;
  }
  const event = {
    event_id: crypto.randomUUID(),
    user_id: state.user,
    movie_id: item.movie_id,
    type,
    ts: Date.now(),
    context: { device: "web", surface: "live-page", carousel_id: row, position },
  };
  if (value !== undefined) event.value = value;
  el.classList.add("pending");
  state.sentAt = performance.now();
  let response;
  try {
    response = await fetch("api/track", {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${state.token}` },
      body: JSON.stringify(event),
    });
  } catch (e) {
    el.classList.remove("pending");
    $("#last-update").textContent = `${type} not sent: ${e.message}`;
    return;
  }
  if (!response.ok) {
    el.classList.remove("pending");
    const body = await response.json().catch(() => ({}));
    $("#last-update").textContent = `${type} refused (${response.status}): ${body.detail || ""}`;
  }
}

async function loadKnownUsers() {
  try {
    const { users } = await getJson("api/users?limit=200");
    $("#known-users").replaceChildren(...users.map((u) => Object.assign(document.createElement("option"), { value: u })));
  } catch (_) { /* the engine may still be starting */ }
}

$("#user-form").addEventListener("submit", (e) => { e.preventDefault(); openUser($("#user-input").value.trim()); });
$("#settings-toggle").addEventListener("click", () => { $("#settings").hidden = !$("#settings").hidden; });
$("#settings").addEventListener("submit", (e) => {
  e.preventDefault();
  if ($("#token-input").value) {
    state.token = $("#token-input").value.trim();
    sessionStorage.setItem("recstream.token", state.token);
  }
  state.tmdbKey = $("#tmdb-input").value.trim();
  localStorage.setItem("recstream.tmdbKey", state.tmdbKey);
  $("#settings").hidden = true;
  showWrites();
  if (state.user) { state.versions.carousels = -1; refetch(); }
});

const initialUser = readHash();
showWrites();
loadKnownUsers();
openUser(initialUser);
