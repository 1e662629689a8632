// MedPLIB-JAX demo page: upload an image, draw a region prompt, ask, show the answer and masks.
"use strict";

const $ = (id) => document.getElementById(id);
const view = $("view"), overlay = $("overlay");
const ctx = view.getContext("2d");
let file = null, image = null, regionPrompt = null, drag = null;

function tool() { return document.querySelector("input[name=tool]:checked").value; }

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// Mouse position in original-image pixels (the canvas is scaled by CSS).
function imagePoint(ev) {
  const r = view.getBoundingClientRect();
  const x = (ev.clientX - r.left) * (view.width / r.width);
  const y = (ev.clientY - r.top) * (view.height / r.height);
  return [Math.min(Math.max(Math.round(x), 0), view.width - 1),
          Math.min(Math.max(Math.round(y), 0), view.height - 1)];
}

function redraw() {
  if (!image) return;
  ctx.drawImage(image, 0, 0);
  if (!regionPrompt) return;
  ctx.lineWidth = Math.max(2, view.width / 200);
  ctx.strokeStyle = "#34d399";
  ctx.fillStyle = "rgba(52, 211, 153, 0.25)";
  if (regionPrompt.point) {
    const [x, y] = regionPrompt.point;
    ctx.beginPath(); ctx.arc(x, y, ctx.lineWidth * 3, 0, 2 * Math.PI); ctx.fill(); ctx.stroke();
  } else if (regionPrompt.box) {
    const [x0, y0, x1, y1] = regionPrompt.box;
    ctx.fillRect(x0, y0, x1 - x0, y1 - y0); ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  } else if (regionPrompt.polygon) {
    ctx.beginPath();
    regionPrompt.polygon.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.closePath(); ctx.fill(); ctx.stroke();
  }
}

function clearOverlay() {
  overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
  overlay.dataset.rendered = "0";
}

$("image").addEventListener("change", () => {
  file = $("image").files[0] || null;
  regionPrompt = null;
  if (!file) return;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    image = img;
    view.width = overlay.width = img.naturalWidth;
    view.height = overlay.height = img.naturalHeight;
    clearOverlay();
    redraw();
    $("ask").disabled = false;
    setStatus(`${img.naturalWidth} x ${img.naturalHeight} image loaded`);
  };
  img.onerror = () => setStatus("the browser cannot display this file as an image", true);
  img.src = url;
});

document.querySelectorAll("input[name=tool]").forEach((el) =>
  el.addEventListener("change", () => { regionPrompt = null; redraw(); }));

view.addEventListener("mousedown", (ev) => {
  if (!image) return;
  const p = imagePoint(ev);
  const t = tool();
  if (t === "point") regionPrompt = { point: p };
  else if (t === "box") { drag = p; regionPrompt = { box: [p[0], p[1], p[0], p[1]] }; }
  else if (t === "polygon") { drag = p; regionPrompt = { polygon: [p] }; }
  redraw();
});

view.addEventListener("mousemove", (ev) => {
  if (!drag) return;
  const p = imagePoint(ev);
  if (regionPrompt.box) {
    regionPrompt.box = [Math.min(drag[0], p[0]), Math.min(drag[1], p[1]),
                  Math.max(drag[0], p[0]), Math.max(drag[1], p[1])];
  } else if (regionPrompt.polygon) {
    regionPrompt.polygon.push(p);
  }
  redraw();
});

window.addEventListener("mouseup", () => {
  if (drag && regionPrompt && regionPrompt.polygon && regionPrompt.polygon.length < 3) regionPrompt = null;
  drag = null;
  redraw();
});

// Colours a 0/255 mask PNG and draws it on the overlay canvas.
function drawMask(pngB64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const tmp = document.createElement("canvas");
      tmp.width = img.naturalWidth; tmp.height = img.naturalHeight;
      const t = tmp.getContext("2d");
      t.drawImage(img, 0, 0);
      const px = t.getImageData(0, 0, tmp.width, tmp.height);
      for (let i = 0; i < px.data.length; i += 4) {
        const on = px.data[i] > 127;
        px.data[i] = 255; px.data[i + 1] = 40; px.data[i + 2] = 40;
        px.data[i + 3] = on ? 115 : 0;
      }
      t.putImageData(px, 0, 0);
      overlay.getContext("2d").drawImage(tmp, 0, 0, overlay.width, overlay.height);
      resolve();
    };
    img.onerror = () => reject(new Error("mask image could not be decoded"));
    img.src = "data:image/png;base64," + pngB64;
  });
}

$("ask").addEventListener("click", async () => {
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  form.append("question", $("question").value);
  form.append("prompt", JSON.stringify(regionPrompt || {}));
  form.append("force_mask", $("force").checked ? "1" : "0");
  form.append("max_new_tokens", $("max-tokens").value);
  $("ask").disabled = true;
  $("answer").dataset.state = "waiting";
  clearOverlay();
  setStatus("thinking ...");
  try {
    const resp = await fetch("/v1/predict", { method: "POST", body: form });
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error || `HTTP ${resp.status}`);
    $("answer").textContent = data.text || "(the model answered with special tokens only)";
    for (const m of data.masks) await drawMask(m.png_b64);
    overlay.dataset.rendered = data.masks.length ? "1" : "0";
    overlay.dataset.area = data.masks.length ? String(data.masks[0].area) : "0";
    $("answer").dataset.state = "done";
    const masks = data.masks.length ? `, ${data.masks.length} mask(s)${data.forced ? " (forced)" : ""}` : "";
    setStatus(`answered in ${data.elapsed_s.toFixed(2)} s${masks}`);
  } catch (err) {
    $("answer").dataset.state = "error";
    setStatus(err.message, true);
  } finally {
    $("ask").disabled = false;
  }
});
