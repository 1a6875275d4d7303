// The demo page: upload an image (or pick a sample, or draw one) to POST /caption (with
// attention=true), show the captions with their confidences and a warning when the service says
// the image is out of the model's domain, and paint a word's attention weights over the image when
// it is hovered, focused or tapped. Plain DOM code, no build step, no third-party scripts.
"use strict";

const API_KEY_STORAGE = "captioning.apiKey";
const MAX_STAGE_HEIGHT_PX = 480; // tall images are narrowed so the picture stays on screen
const REQUEST_TIMEOUT_MS = 60000; // the page gives up on an answer after this long (see caption())
// "Inferno"-like colour map: dark purple for little attention through orange to pale yellow.
const COLOUR_STOPS = [
  [0.0, [0, 0, 4]],
  [0.25, [87, 16, 110]],
  [0.5, [188, 55, 84]],
  [0.75, [249, 142, 9]],
  [1.0, [252, 255, 164]],
];
const MIN_ALPHA = 0.15; // where the model hardly looked, the picture shows through
const MAX_ALPHA = 0.75;

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("caption-form"), fileInput: $("file-input"), dropZone: $("drop-zone"),
  strategy: $("strategy"), beamSize: $("beam-size"), numCaptions: $("num-captions"),
  mirrorView: $("mirror-view"), mirrorViewField: $("mirror-view-field"),
  grounded: $("grounded"), groundedField: $("grounded-field"),
  beamSizeField: $("beam-size-field"), numCaptionsField: $("num-captions-field"),
  captionButton: $("caption-button"), apiKeyRow: $("api-key-row"), apiKey: $("api-key"),
  modelInfo: $("model-info"), result: $("result"), stage: $("stage"), preview: $("preview"),
  heatmap: $("heatmap"), legend: $("legend"), legendBar: $("legend-bar"),
  attentionLabel: $("attention-label"), status: $("status"), error: $("error"),
  captions: $("captions"), wordsHint: $("words-hint"), timing: $("timing"),
  domainWarning: $("domain-warning"), samples: $("samples"), pad: $("pad"), padShape: $("pad-shape"),
  padColour: $("pad-colour"), padSize: $("pad-size"), padBackground: $("pad-background"),
  padClear: $("pad-clear"), padCaption: $("pad-caption"),
};
// The pad's colours: those the model names (app/static is not tied to the training renderer; any
// clear hue of each name works).
const PAD_COLOURS = { red: "#e12323", green: "#28c83c", blue: "#2d5ff5", yellow: "#f5e128", purple: "#aa3cdc",
  orange: "#ff8c14" };
const PAD_SIZES = { large: 0.3, small: 0.13 }; // object width / pad side, as the model card defines them

const state = {
  file: null,
  previewUrl: null,
  request: null, // AbortController of the caption request in flight
  grid: null, // {height, width} of the attention grid
  shown: null, // the word button whose attention is painted
  pinned: null, // the word button tapped or clicked, shown when nothing is hovered
};

// --- colour map and heatmap -------------------------------------------------------------------

function colourAt(value) {
  const v = Math.min(1, Math.max(0, value));
  for (let i = 1; i < COLOUR_STOPS.length; i += 1) {
    const [end, high] = COLOUR_STOPS[i];
    if (v <= end) {
      const [start, low] = COLOUR_STOPS[i - 1];
      const t = (v - start) / (end - start);
      return low.map((channel, c) => Math.round(channel + t * (high[c] - channel)));
    }
  }
  return COLOUR_STOPS[COLOUR_STOPS.length - 1][1];
}

function drawLegend() {
  const context = ui.legendBar.getContext("2d");
  const { width, height } = ui.legendBar;
  for (let x = 0; x < width; x += 1) {
    const [r, g, b] = colourAt(x / (width - 1));
    context.fillStyle = `rgb(${r}, ${g}, ${b})`;
    context.fillRect(x, 0, 1, height);
  }
}

// Paints `weights` (row-major over the grid) over the image: one pixel per grid cell on a small
// canvas, scaled up with smoothing to the displayed image box.
function paintHeatmap(weights) {
  const box = ui.preview.getBoundingClientRect();
  const scale = window.devicePixelRatio || 1;
  const canvas = ui.heatmap;
  canvas.width = Math.max(1, Math.round(box.width * scale));
  canvas.height = Math.max(1, Math.round(box.height * scale));
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (!weights || !state.grid) return;

  const { height, width } = state.grid;
  const cells = document.createElement("canvas");
  cells.width = width;
  cells.height = height;
  const cellContext = cells.getContext("2d");
  const pixels = cellContext.createImageData(width, height);
  const peak = Math.max(...weights) || 1;
  weights.forEach((weight, i) => {
    const value = weight / peak;
    const [r, g, b] = colourAt(value);
    pixels.data.set([r, g, b, Math.round(255 * (MIN_ALPHA + (MAX_ALPHA - MIN_ALPHA) * value))], i * 4);
  });
  cellContext.putImageData(pixels, 0, 0);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(cells, 0, 0, canvas.width, canvas.height);
}

function showAttention(button) {
  if (state.shown) state.shown.classList.remove("is-shown");
  state.shown = button;
  if (!button) {
    paintHeatmap(null);
    ui.legend.hidden = true;
    ui.attentionLabel.textContent = state.grid ? "Hover over or tap a word to see its attention." : "";
    return;
  }
  button.classList.add("is-shown");
  paintHeatmap(button.attentionWeights);
  ui.legend.hidden = false;
  ui.attentionLabel.textContent = `Attention for “${button.textContent}” (caption ${button.captionRank}).`;
}

function pin(button) {
  if (state.pinned) state.pinned.setAttribute("aria-pressed", "false");
  state.pinned = state.pinned === button ? null : button;
  if (state.pinned) state.pinned.setAttribute("aria-pressed", "true");
  showAttention(state.pinned);
}

// --- rendering the result ---------------------------------------------------------------------

function percent(confidence) {
  return `${Math.round(confidence * 100)}%`;
}

function wordButton(word, rank) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "word";
  button.textContent = word.word;
  button.setAttribute("aria-pressed", "false");
  button.attentionWeights = word.attention;
  button.captionRank = rank;
  button.addEventListener("pointerenter", () => showAttention(button));
  button.addEventListener("pointerleave", () => showAttention(state.pinned));
  button.addEventListener("focus", () => showAttention(button));
  button.addEventListener("blur", () => showAttention(state.pinned));
  button.addEventListener("click", () => pin(button));
  return button;
}

function captionItem(caption, rank) {
  const item = document.createElement("li");
  item.className = "caption";

  const words = document.createElement("p");
  words.className = "caption-text";
  if (caption.words && caption.words.length) {
    caption.words.forEach((word, i) => {
      if (i) words.append(" ");
      words.append(wordButton(word, rank));
    });
  } else {
    words.textContent = caption.text || "(empty caption)";
  }

  const confidence = document.createElement("div");
  confidence.className = "confidence";
  const label = document.createElement("span");
  label.className = "confidence-value";
  label.textContent = `${percent(caption.confidence)} confidence`;
  label.title = caption.log_prob == null
    ? "estimated chance that this caption is right; written from the objects the model sees, not by its decoder"
    : `estimated chance that this caption is right; log-probability ${caption.log_prob.toFixed(3)}`;
  const bar = document.createElement("span");
  bar.className = "confidence-bar";
  bar.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.style.width = percent(caption.confidence);
  bar.append(fill);
  confidence.append(label, bar);
  if (caption.agrees_with_scene === false || caption.written_from_scene) {
    const note = document.createElement("span");
    note.className = caption.written_from_scene ? "written" : "disagrees";
    note.textContent = caption.written_from_scene
      ? "written from the objects the model sees: no caption of its decoder matched them"
      : "does not match the objects the model sees";
    confidence.append(note);
  }

  item.append(words, confidence);
  return item;
}

function showDomain(body) {
  if (body.in_domain === false) {
    ui.domainWarning.textContent = "This image does not look like the scenes this model was trained on " +
      `(domain score ${body.domain_score.toFixed(2)}, below 0.5): the captions below are probably wrong.`;
    ui.domainWarning.hidden = false;
  } else {
    ui.domainWarning.hidden = true;
  }
}

function showCaptions(body) {
  showDomain(body);
  state.grid = body.attention_grid || null;
  state.pinned = null;
  ui.captions.replaceChildren(...body.captions.map((caption, i) => captionItem(caption, i + 1)));
  ui.wordsHint.hidden = !state.grid;
  const t = body.timing_ms;
  const domain = body.domain_score === undefined ? "" : ` · domain score ${body.domain_score.toFixed(2)}`;
  ui.timing.textContent = `${body.image.width}×${body.image.height} ${body.image.format} · ` +
    `${Math.round(t.total)} ms (queue ${Math.round(t.queue)} ms, inference ${Math.round(t.inference)} ms)${domain}`;
  ui.status.textContent = body.captions.length > 1 ? `${body.captions.length} captions, best first` : "Caption";
  showAttention(null);
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearResult() {
  ui.domainWarning.hidden = true;
  ui.error.hidden = true;
  ui.error.textContent = "";
  ui.captions.replaceChildren();
  ui.timing.textContent = "";
  ui.wordsHint.hidden = true;
  state.grid = null;
  state.pinned = null;
  showAttention(null);
}

// --- talking to the service -------------------------------------------------------------------

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { "X-API-Key": key } : {};
}

function requireApiKey() {
  ui.apiKeyRow.hidden = false;
}

function decodingParameters() {
  const strategy = ui.strategy.value;
  const params = new URLSearchParams({ strategy, attention: "true", mirror_view: String(ui.mirrorView.checked) });
  // Grounded reranking needs a beam's candidates and a model with a scene head (/model says).
  if (!ui.groundedField.hidden && ui.grounded.checked && strategy === "beam") params.set("grounded", "true");
  const count = clampInput(ui.numCaptions);
  if (strategy === "beam") {
    const beamSize = clampInput(ui.beamSize);
    params.set("beam_size", beamSize);
    params.set("num_captions", Math.min(count, beamSize));
  } else if (strategy === "sample") {
    params.set("num_captions", count);
  }
  return params;
}

function clampInput(input) {
  const value = Math.round(Number(input.value));
  const clamped = Math.min(Number(input.max), Math.max(Number(input.min), Number.isFinite(value) ? value : 1));
  input.value = clamped;
  return clamped;
}

async function describeFailure(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${body.error.message} (${body.error.code}, HTTP ${response.status})`;
  } catch (ignored) {
    // not JSON: fall through to the status line
  }
  return `the service answered HTTP ${response.status} ${response.statusText}`.trim();
}

async function caption() {
  if (!state.file) return;
  if (state.request) state.request.abort();
  const request = new AbortController();
  state.request = request;
  // A proxy that holds the request would leave "Captioning…" for ever; the service's own deadline
  // (REQUEST_TIMEOUT_S, 30 s by default) answers well before this.
  let timedOut = false;
  const timer = setTimeout(() => { timedOut = true; request.abort(); }, REQUEST_TIMEOUT_MS);
  clearResult();
  ui.status.textContent = "Captioning…";
  ui.result.setAttribute("aria-busy", "true");

  const form = new FormData();
  form.append("image", state.file, state.file.name || "upload");
  try {
    const response = await fetch(`/caption?${decodingParameters()}`, {
      method: "POST", body: form, headers: authHeaders(), signal: request.signal,
    });
    if (response.status === 401) requireApiKey();
    if (!response.ok) {
      ui.status.textContent = "";
      showError(`Could not caption this image: ${await describeFailure(response)}`);
      return;
    }
    showCaptions(await response.json());
  } catch (error) {
    ui.status.textContent = "";
    if (timedOut) {
      showError(`The captioning service did not answer within ${REQUEST_TIMEOUT_MS / 1000} s. Try again later.`);
      return;
    }
    if (error.name === "AbortError") return; // a newer request replaced this one
    showError("Could not reach the captioning service. Check your connection and try again.");
  } finally {
    clearTimeout(timer);
    if (state.request === request) {
      state.request = null;
      ui.result.removeAttribute("aria-busy");
    }
  }
}

async function describeModel() {
  try {
    const response = await fetch("/model", { headers: authHeaders() });
    if (response.status === 401) {
      requireApiKey();
      ui.modelInfo.textContent = "Enter the service's API key to caption images.";
      return;
    }
    if (!response.ok) {
      ui.modelInfo.textContent = `Model information unavailable: ${await describeFailure(response)}`;
      return;
    }
    const model = await response.json();
    if (!model.mirror_view) { // a vocabulary that cannot word a mirrored caption: the option would get 422
      ui.mirrorView.checked = false;
      ui.mirrorViewField.hidden = true;
    }
    ui.groundedField.hidden = !model.grounded;
    ui.modelInfo.textContent = `Model ${model.name} (version ${model.version}), ` +
      `attention over a ${model.feature_grid[0]}×${model.feature_grid[1]} grid.`;
  } catch (error) {
    ui.modelInfo.textContent = "The captioning service could not be reached.";
  }
}

// --- choosing an image ------------------------------------------------------------------------

function fitStage() {
  const { naturalWidth: width, naturalHeight: height } = ui.preview;
  if (!width || !height) return;
  // Narrow the stage for tall images so that the whole picture (and its heatmap) stays visible.
  const widest = Math.round((MAX_STAGE_HEIGHT_PX * width) / height);
  ui.stage.style.width = `min(100%, ${Math.min(widest, MAX_STAGE_HEIGHT_PX)}px)`;
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  ui.preview.src = state.previewUrl;
  ui.preview.alt = `The uploaded image${file.name ? `, ${file.name}` : ""}`;
  ui.result.hidden = false;
  ui.captionButton.disabled = false;
  // On a phone the result is below the controls: bring it into view.
  if (ui.result.getBoundingClientRect().top > window.innerHeight * 0.6) ui.result.scrollIntoView({ block: "start" });
  caption();
}

// --- samples and the drawing pad --------------------------------------------------------------

async function chooseSample(name) {
  try {
    const response = await fetch(`/static/samples/${name}`);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const blob = await response.blob();
    chooseFile(new File([blob], name, { type: blob.type }));
  } catch (error) {
    ui.result.hidden = false;
    showError(`Could not load the sample ${name}.`);
  }
}

function clearPad() {
  const context = ui.pad.getContext("2d");
  context.fillStyle = ui.padBackground.value;
  context.fillRect(0, 0, ui.pad.width, ui.pad.height);
  state.padShapes = 0;
  ui.padCaption.disabled = true;
}

function stamp(x, y) {
  const context = ui.pad.getContext("2d");
  const half = (PAD_SIZES[ui.padSize.value] * ui.pad.width) / 2;
  context.fillStyle = PAD_COLOURS[ui.padColour.value];
  context.beginPath();
  const shape = ui.padShape.value;
  if (shape === "circle") {
    context.arc(x, y, half, 0, 2 * Math.PI);
  } else if (shape === "square") {
    context.rect(x - half, y - half, 2 * half, 2 * half);
  } else if (shape === "triangle") {
    context.moveTo(x, y - half); context.lineTo(x + half, y + half); context.lineTo(x - half, y + half);
  } else if (shape === "diamond") {
    context.moveTo(x, y - half); context.lineTo(x + half, y); context.lineTo(x, y + half); context.lineTo(x - half, y);
  } else {
    const arm = 0.36 * half;
    context.rect(x - half, y - arm, 2 * half, 2 * arm);
    context.rect(x - arm, y - half, 2 * arm, 2 * half);
  }
  context.fill();
  state.padShapes = (state.padShapes || 0) + 1;
  ui.padCaption.disabled = false;
}

function padPoint(event) {
  const box = ui.pad.getBoundingClientRect();
  return [((event.clientX - box.left) * ui.pad.width) / box.width, ((event.clientY - box.top) * ui.pad.height) / box.height];
}

function captionDrawing() {
  ui.pad.toBlob((blob) => chooseFile(new File([blob], "drawing.png", { type: "image/png" })), "image/png");
}

function setUpTryIt() {
  ui.samples.querySelectorAll("[data-sample]").forEach((button) => {
    button.addEventListener("click", () => chooseSample(button.dataset.sample));
  });
  clearPad();
  ui.pad.addEventListener("click", (event) => stamp(...padPoint(event)));
  ui.padClear.addEventListener("click", clearPad);
  ui.padBackground.addEventListener("change", clearPad);
  ui.padCaption.addEventListener("click", captionDrawing);
}

function updateOptionFields() {
  const strategy = ui.strategy.value;
  ui.beamSizeField.hidden = strategy !== "beam";
  ui.numCaptionsField.hidden = strategy === "greedy";
  if (strategy === "beam") ui.numCaptions.max = clampInput(ui.beamSize);
  else ui.numCaptions.max = 10;
  clampInput(ui.numCaptions);
}

function setUp() {
  drawLegend();
  ui.apiKey.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
  if (ui.apiKey.value) ui.apiKeyRow.hidden = false;
  ui.apiKey.addEventListener("change", () => {
    sessionStorage.setItem(API_KEY_STORAGE, ui.apiKey.value.trim());
    describeModel();
  });

  ui.fileInput.addEventListener("change", () => {
    chooseFile(ui.fileInput.files[0]);
    ui.fileInput.value = ""; // so that choosing the same file again (after an error) captions it again
  });
  ["dragenter", "dragover"].forEach((type) => ui.dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    ui.dropZone.classList.add("is-dragging");
  }));
  ["dragleave", "drop"].forEach((type) => ui.dropZone.addEventListener(type, () => {
    ui.dropZone.classList.remove("is-dragging");
  }));
  // A file dropped anywhere on the page is taken: the browser's own action would open it in place
  // of the page, losing the result.
  // (Files only: dragged text still lands in the API-key field.)
  const carriesFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  document.addEventListener("dragover", (event) => { if (carriesFiles(event)) event.preventDefault(); });
  document.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    chooseFile(event.dataTransfer.files[0]);
  });
  // A pasted image (a screenshot copied to the clipboard) too.
  document.addEventListener("paste", (event) => {
    const file = [...event.clipboardData.files].find((item) => item.type.startsWith("image/"));
    if (!file) return;
    event.preventDefault();
    chooseFile(file);
  });

  ui.strategy.addEventListener("change", updateOptionFields);
  ui.beamSize.addEventListener("change", updateOptionFields);
  ui.numCaptions.addEventListener("change", updateOptionFields);
  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    caption();
  });

  ui.preview.addEventListener("load", () => {
    fitStage();
    showAttention(state.shown);
  });
  window.addEventListener("resize", () => showAttention(state.shown));
  updateOptionFields();
  setUpTryIt();
  describeModel();
}

setUp();
