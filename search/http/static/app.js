"use strict";
// The search page of `clipdex serve`: plain JavaScript, no build step.
//
// With a token, open the page once as /#token=TOKEN (or /?token=TOKEN), or type the token
// when the page asks. It is kept in this browser's localStorage, removed from the address
// bar, and sent as "Authorization: Bearer TOKEN" on every API request. Thumbnails are
// fetched with that header too and shown from blob: URLs, so the token never appears in
// a URL the server logs.

const ROOT = new URL("..", document.currentScript.src); // where the app is mounted
const TOKEN_KEY = "clipdex.token";
const THUMBNAIL_SIZE = 256;

const state = {
  request: null, // the current search: {text, imageFile, like}
  imageFile: null, // the image chosen or dropped, until it is cleared
  offset: 0,
  thumbnailUrls: [],
  searchNumber: 0, // counts searches started; only the latest one may show its answer
  explain: false, // the "Where?" toggle: image hits show where the query matches (POST explain/overlay)
};

const $ = (id) => document.getElementById(id);

class Unauthorized extends Error {}

function takeTokenFromUrl() {
  const url = new URL(location.href);
  const fragment = new URLSearchParams(url.hash.slice(1));
  const token = fragment.get("token") || url.searchParams.get("token");
  if (!token) return;
  localStorage.setItem(TOKEN_KEY, token);
  fragment.delete("token");
  url.searchParams.delete("token");
  url.hash = fragment.toString();
  history.replaceState(null, "", url);
}

async function api(path, init = {}) {
  const token = localStorage.getItem(TOKEN_KEY);
  const headers = new Headers(init.headers || {});
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const response = await fetch(new URL(path, ROOT), { ...init, headers });
  if (response.status === 401) {
    showTokenPanel();
    throw new Unauthorized(token ? "The server refused this token; enter the right one." : "This server needs an access token.");
  }
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) {
      return body.detail.map((problem) => `${problem.loc.slice(1).join(".")}: ${problem.msg}`).join("; ");
    }
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return `${response.status} ${response.statusText}`;
}

function setStatus(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

function showTokenPanel() {
  $("token-panel").hidden = false;
  $("token-input").focus();
}

// -- the query --------------------------------------------------------------------------

function filterOptions() {
  const options = { kind: $("filter-kind").value, k: Number($("filter-k").value) || 24 };
  for (const [id, name] of [["filter-path", "path"], ["filter-after", "after"], ["filter-before", "before"]]) {
    const value = $(id).value.trim();
    if (value) options[name] = value;
  }
  for (const [id, name] of [["filter-min-width", "min_width"], ["filter-min-height", "min_height"], ["filter-threshold", "threshold"]]) {
    if ($(id).value !== "") options[name] = Number($(id).value);
  }
  if ($("filter-mode").value) options.mode = $("filter-mode").value;
  if ($("filter-sort").value !== "relevance") options.sort = $("filter-sort").value;
  if ($("filter-confident").checked) options.confident = true;
  return options;
}

function jsonSearch(request, options) {
  const body = { ...options };
  if (request.text) body.text = request.text;
  if (request.like.length) body.like = request.like;
  return api("search", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function imageSearch(request, options) {
  const form = new FormData();
  form.append("image", request.imageFile, request.imageFile.name);
  if (request.text) form.append("text", request.text);
  for (const [name, value] of Object.entries(options)) form.append(name, String(value));
  return api("search/image", { method: "POST", body: form });
}

async function runSearch(append = false) {
  const request = state.request;
  if (!request) return;
  const options = filterOptions();
  state.offset = append ? state.offset + options.k : 0;
  options.offset = state.offset;
  setStatus(append ? "Loading more…" : "Searching…");
  // Searches overlap (a filter changed while the last one ran; the server may answer them in
  // any order): an answer is shown only while no newer search has started since it was asked.
  const number = ++state.searchNumber;
  const isLatest = () => number === state.searchNumber;
  try {
    const response = await (request.imageFile ? imageSearch(request, options) : jsonSearch(request, options));
    const result = await response.json();
    if (!isLatest()) return;
    renderHits(result.hits, append);
    $("more-button").hidden = result.hits.length < options.k;
    const shown = $("results").children.length;
    setStatus(shown ? `${shown} results for ${describe(request)} (${result.took_ms} ms)` : `No results for ${describe(request)}.`);
  } catch (error) {
    if (isLatest()) setStatus(error.message, true);
  }
}

function describe(request) {
  const parts = [];
  if (request.text) parts.push(`“${request.text}”`);
  if (request.imageFile) parts.push(`image ${request.imageFile.name}`);
  if (request.like.length) parts.push(`more like ${request.likeName}`);
  return parts.join(" + ");
}

function searchFromForm(event) {
  if (event) event.preventDefault();
  const text = $("query").value.trim();
  if (!text && !state.imageFile) {
    setStatus("Type what you are looking for, or drop an image.");
    return;
  }
  state.request = { text, imageFile: state.imageFile, like: [] };
  runSearch();
}

function moreLikeThis(hit) {
  clearImage();
  $("query").value = "";
  state.request = { text: "", imageFile: null, like: [hit.id], likeName: hitName(hit) };
  runSearch();
}

// -- results ----------------------------------------------------------------------------

function clearResults() {
  for (const url of state.thumbnailUrls) URL.revokeObjectURL(url);
  state.thumbnailUrls = [];
  $("results").replaceChildren();
}

function renderHits(hits, append) {
  if (!append) clearResults();
  $("results").append(...hits.map(hitCard));
}

function hitCard(hit) {
  const card = document.createElement("figure");
  card.className = "hit";
  card.tabIndex = 0;
  card.dataset.id = hit.id;
  card.dataset.kind = hit.kind;
  const name = hitName(hit);
  card.title = `${hit.path || hit.text}\nClick for more like this`;
  if (hit.kind === "image") {
    const image = document.createElement("img");
    image.alt = name;
    card.append(withBoxes(image, hit));
    loadThumbnail(image, hit.id);
    if (state.explain) showExplanation(card, image);
  } else if (hit.kind === "video") {
    const image = document.createElement("img");
    image.alt = `${name} at ${clock(hit.timestamp)}`;
    card.append(image, playButton(hit, image));
    loadThumbnail(image, hit.id, `&t=${hit.timestamp}`);
    card.dataset.timestamp = hit.timestamp;
    if (state.explain) showExplanation(card, image);
  } else {
    const quote = document.createElement("blockquote");
    quote.textContent = hit.text;
    card.append(quote);
  }
  card.append(caption(hit.score, name));
  if (hit.snippet) card.append(snippetElement(hit.snippet));
  card.addEventListener("click", () => moreLikeThis(hit));
  card.addEventListener("keydown", (event) => {
    if (event.key === "Enter") moreLikeThis(hit);
  });
  return card;
}

// The words a hybrid or keyword search matched: the snippet under the card, each match «marked»
// by the server, shown as <mark> (built from text nodes: a snippet is never HTML).
function snippetElement(snippet) {
  const element = document.createElement("p");
  element.className = "snippet";
  snippet.split(/«([^»]*)»/).forEach((part, index) => {
    if (index % 2 === 0) {
      element.append(part);
    } else {
      const mark = document.createElement("mark");
      mark.textContent = part;
      element.append(mark);
    }
  });
  return element;
}

// The OCR lines that matched, outlined on the thumbnail: an SVG in the image's own pixels over it,
// cropped as the thumbnail is (preserveAspectRatio "slice" is what object-fit "cover" does).
const SVG = "http://www.w3.org/2000/svg";

function withBoxes(image, hit) {
  const width = hit.metadata && hit.metadata.width;
  const height = hit.metadata && hit.metadata.height;
  if (!hit.boxes || !hit.boxes.length || !width || !height) return image;
  const frame = document.createElement("div");
  frame.className = "thumb";
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "boxes");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid slice");
  for (const box of hit.boxes) {
    const outline = document.createElementNS(SVG, "polygon");
    outline.setAttribute("points", box.map(([x, y]) => `${x},${y}`).join(" "));
    svg.append(outline);
  }
  frame.append(image, svg);
  return frame;
}

function hitName(hit) {
  if (hit.kind === "video") return `${hit.path.split(/[\\/]/).pop()} @ ${clock(hit.timestamp)}`;
  return hit.kind === "image" ? hit.path.split(/[\\/]/).pop() : `text #${hit.id}`;
}

// A video's moment as mm:ss (h:mm:ss from an hour on), as the CLI's table shows it.
function clock(seconds) {
  const whole = Math.max(0, Math.floor(seconds || 0));
  const pad = (value) => String(value).padStart(2, "0");
  const hours = Math.floor(whole / 3600);
  const rest = whole % 3600;
  return hours ? `${hours}:${pad(Math.floor(rest / 60))}:${pad(rest % 60)}` : `${pad(Math.floor(rest / 60))}:${pad(rest % 60)}`;
}

// Plays the video in place of its frame, from the hit's moment. Without a token the browser streams
// the file itself (the server answers its Range requests, so it can seek); a token cannot ride on a
// <video>'s own requests, so then the file is fetched whole first.
function playButton(hit, image) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "play";
  button.textContent = `▶ ${clock(hit.timestamp)}`;
  button.addEventListener("click", async (event) => {
    event.stopPropagation();
    const video = document.createElement("video");
    video.controls = true;
    video.autoplay = true;
    const moment = `#t=${hit.timestamp}`;
    if (localStorage.getItem(TOKEN_KEY)) {
      const url = URL.createObjectURL(await (await api(`items/${hit.id}/file`)).blob());
      state.thumbnailUrls.push(url);
      video.src = url + moment;
    } else {
      video.src = new URL(`items/${hit.id}/file`, ROOT).href + moment;
    }
    image.replaceWith(video);
    button.remove();
  });
  return button;
}

function caption(score, name) {
  const element = document.createElement("figcaption");
  const scoreElement = document.createElement("span");
  scoreElement.className = "score";
  scoreElement.textContent = score.toFixed(3);
  const nameElement = document.createElement("span");
  nameElement.className = "name";
  nameElement.textContent = name;
  element.append(scoreElement, nameElement);
  return element;
}

async function loadThumbnail(image, id, moment = "") {
  try {
    const response = await api(`items/${id}/thumbnail?size=${THUMBNAIL_SIZE}${moment}`);
    const url = URL.createObjectURL(await response.blob());
    state.thumbnailUrls.push(url);
    image.dataset.thumbnail = url;
    if (!(state.explain && image.dataset.overlay)) image.src = url;
  } catch (error) {
    image.alt = `no thumbnail: ${error.message}`;
  }
}

// -- where the query matches (the "Where?" toggle) --------------------------------------

function fileAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function explainTerms(request) {
  const body = {};
  if (request.text) body.text = request.text;
  if (request.like.length) body.like = request.like;
  if (request.imageFile) body.image = [await fileAsDataUrl(request.imageFile)];
  return body;
}

// The overlay of one image hit, asked for the first time the toggle is on while it is shown.
async function showExplanation(card, image) {
  if (image.dataset.overlay) {
    image.src = image.dataset.overlay;
    card.classList.add("explained");
    return;
  }
  const request = state.request;
  if (!request || image.dataset.explaining) return;
  image.dataset.explaining = "1";
  try {
    const body = { item_id: Number(card.dataset.id), ...(await explainTerms(request)) };
    if (card.dataset.timestamp) body.timestamp = Number(card.dataset.timestamp);  // a video: its frame at the moment
    const response = await api(`explain/overlay?size=${2 * THUMBNAIL_SIZE}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const url = URL.createObjectURL(await response.blob());
    state.thumbnailUrls.push(url);
    image.dataset.overlay = url;
    if (state.explain) {
      image.src = url;
      card.classList.add("explained");
    }
  } catch (error) {
    card.title = `${card.title}\nNo explanation: ${error.message}`;
  } finally {
    delete image.dataset.explaining;
  }
}

function toggleExplanations() {
  state.explain = $("explain-toggle").checked;
  for (const card of $("results").querySelectorAll(".hit[data-kind=image], .hit[data-kind=video]")) {
    const image = card.querySelector("img");
    if (state.explain) {
      showExplanation(card, image);
    } else {
      card.classList.remove("explained");
      if (image.dataset.thumbnail) image.src = image.dataset.thumbnail;
    }
  }
}

// -- the query image --------------------------------------------------------------------

function setImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image.`, true);
    return;
  }
  state.imageFile = file;
  $("image-label").textContent = file.name;
  $("drop-zone").classList.add("has-image");
  $("clear-image").hidden = false;
  searchFromForm();
}

function clearImage() {
  state.imageFile = null;
  $("image-input").value = "";
  $("image-label").textContent = "Drop an image or click";
  $("drop-zone").classList.remove("has-image");
  $("clear-image").hidden = true;
}

function wireDropZone() {
  const zone = $("drop-zone");
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    setImage(event.dataTransfer.files[0]);
  });
  $("image-input").addEventListener("change", (event) => setImage(event.target.files[0]));
  $("clear-image").addEventListener("click", clearImage);
}

// -- start ------------------------------------------------------------------------------

async function loadStats() {
  try {
    const stats = await (await api("stats")).json();
    $("token-panel").hidden = true;
    if (!state.request) {
      setStatus(`${stats.images} images and ${stats.texts} texts in this library (${stats.model}). Type or drop an image to search.`);
    }
    return true;
  } catch (error) {
    setStatus(error.message, true);
    return false;
  }
}

// A server that watches folders (clipdex serve --watch) says what it is indexing.
const INDEXING_POLL_MS = 3000;

async function showIndexing() {
  try {
    const now = await (await api("indexing")).json();
    const files = now.pending + now.indexing;
    $("indexing").hidden = files === 0;
    $("indexing").textContent = `indexing ${files} file${files === 1 ? "" : "s"}…`;
    if (now.enabled) setTimeout(showIndexing, INDEXING_POLL_MS);
  } catch (error) {
    $("indexing").hidden = true;  // an older server, or the token is missing: say nothing
  }
}

async function useToken(event) {
  event.preventDefault();
  localStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
  $("token-input").value = "";
  if ((await loadStats()) && state.request) runSearch();
}

function start() {
  takeTokenFromUrl();
  $("search-form").addEventListener("submit", searchFromForm);
  $("token-form").addEventListener("submit", useToken);
  $("more-button").addEventListener("click", () => runSearch(true));
  $("explain-toggle").addEventListener("change", toggleExplanations);
  $("filters").addEventListener("change", () => runSearch());
  wireDropZone();
  loadStats().then((ok) => { if (ok) showIndexing(); });
}

start();
