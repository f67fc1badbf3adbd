// GMR-Path slide viewer: OpenSeadragon draws the slide's Deep Zoom tiles; this script draws the layers of
// data.js (window.GMR_VIEWER) on a canvas above it: tissue classes (or one class's probability) per tile,
// nuclei outlines when zoomed in and their density when zoomed out, a scale bar in micrometres, and what
// is under a click. Names are written as text only. The URL hash sets the view (for links and tests):
//   #center=X,Y&zoom=R       level-0 pixel X,Y in the middle, R screen pixels per level-0 pixel
//   &layers=classes,nuclei   the layers to show ("none" for the slide alone)
//   &mode=prob&class=NAME    one class's probability instead of the most likely class
//   &select=nucleus:I        centre on nucleus I, zoom in, and show its measurements
(function () {
  "use strict";
  const D = window.GMR_VIEWER;
  const $ = (id) => document.getElementById(id);
  const body = document.body;
  const C = D.classify || null;
  const N = D.nuclei || null;
  const OUTLINE_ZOOM = 0.35; // screen px per level-0 px from which nuclei are drawn as outlines
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

  document.title = D.slide + " \u2014 GMR-Path viewer";
  $("title").textContent = D.slide + " (" + D.file + ")";
  $("mpp").textContent = D.mpp.toFixed(3) + " \u00b5m/px, " + D.dzi.width + " \u00d7 " + D.dzi.height + " px";
  const untrained = [];
  if (C && !C.trained) untrained.push("tissue classes: untrained model (random weights)");
  if (N && !N.trained) untrained.push("nuclei: untrained model");
  $("warning").textContent = untrained.join("; ");

  const params = new URLSearchParams(location.hash.slice(1));
  const want = (params.get("layers") || "classes,nuclei").split(",");
  const state = {
    classes: !!C && want.includes("classes"),
    nuclei: !!N && want.includes("nuclei"),
    mode: params.get("mode") === "prob" ? "prob" : "classes",
    probClass: 0,
    hidden: new Set(),
    opacity: 0.45,
  };

  // --- the slide -------------------------------------------------------------------------------------------
  const source = new OpenSeadragon.DziTileSource({
    width: D.dzi.width, height: D.dzi.height, tileSize: D.dzi.tile_px, tileOverlap: D.dzi.overlap_px,
    tilesUrl: "slide_files/", fileFormat: D.dzi.format, minLevel: D.dzi.min_level, maxLevel: D.dzi.max_level,
  });
  const viewer = OpenSeadragon({
    id: "osd", tileSources: source, showNavigationControl: false, maxZoomPixelRatio: 4, visibilityRatio: 0.5,
    gestureSettingsMouse: { clickToZoom: false }, crossOriginPolicy: false, animationTime: 0.6,
    drawer: "canvas", // a 2D canvas like the layers': no WebGL needed (headless, remote desktops)
  });
  const canvas = $("layer");
  $("osd").appendChild(canvas); // above OpenSeadragon's own elements
  $("osd").appendChild($("scalebar"));
  const ctx = canvas.getContext("2d");

  // --- panel -----------------------------------------------------------------------------------------------
  if (C) {
    $("classify-panel").hidden = false;
    C.classes.forEach((name, k) => {
      const row = document.createElement("div");
      row.className = "row legend-entry";
      const box = document.createElement("input");
      box.type = "checkbox"; box.checked = true; box.dataset.k = k;
      box.addEventListener("change", () => { box.checked ? state.hidden.delete(k) : state.hidden.add(k); draw(); });
      const sw = document.createElement("span");
      sw.className = "swatch"; sw.style.background = "rgb(" + C.colors[k].join(",") + ")";
      const label = document.createElement("span");
      label.className = "legend-name"; label.textContent = name;
      row.append(box, sw, label);
      $("legend").appendChild(row);
      const opt = document.createElement("option");
      opt.value = k; opt.textContent = name;
      $("probclass").appendChild(opt);
    });
    const wanted = C.classes.indexOf(params.get("class"));
    state.probClass = wanted >= 0 ? wanted : 0;
    $("probclass").value = state.probClass;
    document.querySelectorAll("input[name=mode]").forEach((r) => {
      r.checked = r.value === state.mode;
      r.addEventListener("change", () => { state.mode = r.value; $("ramp-box").hidden = state.mode !== "prob"; draw(); });
    });
    $("ramp-box").hidden = state.mode !== "prob";
    $("probclass").addEventListener("change", (e) => { state.probClass = +e.target.value; draw(); });
    $("opacity").addEventListener("input", (e) => { state.opacity = e.target.value / 100; draw(); });
  }
  if (N) {
    $("nuclei-panel").hidden = false;
    $("ncount").textContent = N.polygons.length.toLocaleString("en") + " nuclei";
    $("shownuclei").checked = state.nuclei;
    $("shownuclei").addEventListener("change", (e) => { state.nuclei = e.target.checked; draw(); });
  }
  $("zoomin").addEventListener("click", () => viewer.viewport.zoomBy(2));
  $("zoomout").addEventListener("click", () => viewer.viewport.zoomBy(0.5));
  $("home").addEventListener("click", () => viewer.viewport.goHome());

  // --- nuclei index: bounding boxes, a grid of buckets for hit tests, density cells -----------------------
  const CELL = 256;
  const boxes = [], buckets = new Map(), density = new Map();
  if (N) {
    N.polygons.forEach((p, i) => {
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (let j = 0; j < p.length; j += 2) {
        x0 = Math.min(x0, p[j]); x1 = Math.max(x1, p[j]); y0 = Math.min(y0, p[j + 1]); y1 = Math.max(y1, p[j + 1]);
      }
      boxes.push([x0, y0, x1, y1]);
      const key = Math.floor((x0 + x1) / 2 / CELL) + "," + Math.floor((y0 + y1) / 2 / CELL);
      if (!buckets.has(key)) buckets.set(key, []);
      buckets.get(key).push(i);
      density.set(key, (density.get(key) || 0) + 1);
    });
  }
  const maxDensity = Math.max(1, ...density.values());

  // --- drawing ---------------------------------------------------------------------------------------------
  function toScreen(x, y) {
    const p = viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
    return [p.x, p.y];
  }
  function ratio() { // screen pixels per level-0 pixel
    return viewer.viewport.viewportToImageZoom(viewer.viewport.getZoom(true));
  }
  function viridis(t) {
    const s = Math.min(0.9999, Math.max(0, t)) * (VIRIDIS.length - 1), i = Math.floor(s), f = s - i;
    return VIRIDIS[i].map((v, c) => Math.round(v + (VIRIDIS[i + 1][c] - v) * f));
  }
  let drawn = { tiles: 0, outlines: 0, density: 0 };
  function draw() {
    // the layer's pixels are OpenSeadragon's container pixels (its coordinates); CSS stretches both canvases alike
    const size = viewer.viewport.getContainerSize();
    if (canvas.width !== Math.round(size.x) || canvas.height !== Math.round(size.y)) {
      canvas.width = Math.round(size.x); canvas.height = Math.round(size.y);
    }
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    drawn = { tiles: 0, outlines: 0, density: 0 };
    const r = ratio();
    if (state.classes && C) {
      ctx.globalAlpha = state.opacity;
      for (const t of C.tiles) {
        let rgb;
        if (state.mode === "prob") {
          rgb = viridis(t[4 + state.probClass]);
        } else {
          let best = 0;
          for (let k = 1; k < C.classes.length; k++) if (t[4 + k] > t[4 + best]) best = k;
          if (state.hidden.has(best)) continue;
          rgb = C.colors[best];
        }
        const [sx, sy] = toScreen(t[0], t[1]);
        if (sx > canvas.width || sy > canvas.height || sx + t[2] * r < 0 || sy + t[3] * r < 0) continue;
        ctx.fillStyle = "rgb(" + rgb.join(",") + ")";
        ctx.fillRect(sx, sy, t[2] * r, t[3] * r);
        drawn.tiles++;
      }
      ctx.globalAlpha = 1;
    }
    if (state.nuclei && N) {
      const tl = viewer.viewport.viewerElementToImageCoordinates(new OpenSeadragon.Point(0, 0));
      const br = viewer.viewport.viewerElementToImageCoordinates(new OpenSeadragon.Point(canvas.width, canvas.height));
      if (r >= OUTLINE_ZOOM) {
        ctx.strokeStyle = "rgb(0, 200, 255)";
        ctx.lineWidth = Math.max(1, Math.min(2.5, r));
        ctx.beginPath();
        N.polygons.forEach((p, i) => {
          const b = boxes[i];
          if (b[2] < tl.x || b[0] > br.x || b[3] < tl.y || b[1] > br.y) return;
          const [x0, y0] = toScreen(p[0], p[1]);
          ctx.moveTo(x0, y0);
          for (let j = 2; j < p.length; j += 2) { const [x, y] = toScreen(p[j], p[j + 1]); ctx.lineTo(x, y); }
          ctx.closePath();
          drawn.outlines++;
        });
        ctx.stroke();
      } else {
        for (const [key, count] of density) {
          const [cx, cy] = key.split(",").map(Number);
          const [sx, sy] = toScreen(cx * CELL, cy * CELL);
          ctx.fillStyle = "rgba(0, 200, 255," + (0.15 + 0.6 * count / maxDensity).toFixed(3) + ")";
          ctx.fillRect(sx, sy, CELL * r, CELL * r);
          drawn.density++;
        }
      }
    }
    scaleBar(r);
    body.dataset.drawnTiles = drawn.tiles;
    body.dataset.drawnOutlines = drawn.outlines;
    body.dataset.drawnDensity = drawn.density;

  }
  function scaleBar(r) {
    const umPerScreenPx = D.mpp / r;
    const target = 120 * umPerScreenPx;
    const p = Math.pow(10, Math.floor(Math.log10(target)));
    const nice = [1, 2, 5, 10].map((m) => m * p).filter((v) => v <= target).pop() || p;
    $("scaleline").style.width = (nice / umPerScreenPx).toFixed(1) + "px";
    $("scaletext").textContent = nice >= 1000 ? nice / 1000 + " mm" : nice + " \u00b5m";
  }

  // --- what is under a click -------------------------------------------------------------------------------
  function inside(p, x, y) {
    let hit = false;
    for (let i = 0, j = p.length - 2; i < p.length; j = i, i += 2) {
      if ((p[i + 1] > y) !== (p[j + 1] > y) && x < ((p[j] - p[i]) * (y - p[i + 1])) / (p[j + 1] - p[i + 1]) + p[i]) hit = !hit;
    }
    return hit;
  }
  function nucleusAt(x, y) {
    if (!N) return -1;
    const cx = Math.floor(x / CELL), cy = Math.floor(y / CELL);
    for (let dx = -1; dx <= 1; dx++) for (let dy = -1; dy <= 1; dy++) {
      for (const i of buckets.get((cx + dx) + "," + (cy + dy)) || []) {
        const b = boxes[i];
        if (x >= b[0] && x <= b[2] && y >= b[1] && y <= b[3] && inside(N.polygons[i], x, y)) return i;
      }
    }
    return -1;
  }
  function showNucleus(i) {
    const b = boxes[i];
    $("info").textContent = "nucleus " + i + "\narea " + N.area_um2[i].toFixed(1) + " \u00b5m\u00b2\ncentroid (x, y) " +
      ((b[0] + b[2]) / 2).toFixed(0) + ", " + ((b[1] + b[3]) / 2).toFixed(0) + " px (level 0)";
    body.dataset.selected = "nucleus:" + i;
  }
  function showTile(t) {
    const lines = ["tile at (x, y) " + t[0].toFixed(0) + ", " + t[1].toFixed(0) + " px (level 0)"];
    const order = C.classes.map((_, k) => k).sort((a, b) => t[4 + b] - t[4 + a]);
    for (const k of order) lines.push(C.classes[k].padEnd(8) + " " + t[4 + k].toFixed(3));
    $("info").textContent = lines.join("\n");
    body.dataset.selected = "tile";
  }
  viewer.addHandler("canvas-click", (e) => {
    if (!e.quick) return;
    const p = viewer.viewport.viewerElementToImageCoordinates(e.position);
    const n = state.nuclei && ratio() >= OUTLINE_ZOOM ? nucleusAt(p.x, p.y) : -1;
    if (n >= 0) return showNucleus(n);
    const t = C ? C.tiles.find((t) => p.x >= t[0] && p.x < t[0] + t[2] && p.y >= t[1] && p.y < t[1] + t[3]) : null;
    if (t) return showTile(t);
    $("info").textContent = "nothing here";
  });

  // --- view from the URL hash, then draw on every change ----------------------------------------------------
  viewer.addHandler("open", () => {
    const sel = (params.get("select") || "").match(/^nucleus:(\d+)$/);
    let center = (params.get("center") || "").split(",").map(Number);
    let zoom = Number(params.get("zoom"));
    if (sel && N && +sel[1] < boxes.length) {
      const b = boxes[+sel[1]];
      center = [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2];
      zoom = zoom || 2;
      showNucleus(+sel[1]);
    }
    if (center.length === 2 && center.every(Number.isFinite)) {
      viewer.viewport.panTo(viewer.viewport.imageToViewportCoordinates(center[0], center[1]), true);
    }
    if (zoom > 0) viewer.viewport.zoomTo(viewer.viewport.imageToViewportZoom(zoom), null, true);
    draw();
  });
  for (const ev of ["animation", "update-viewport", "resize"]) viewer.addHandler(ev, draw);
  viewer.addHandler("tile-loaded", () => { body.dataset.tilesLoaded = (+body.dataset.tilesLoaded || 0) + 1; });
  viewer.world.addHandler("add-item", (e) => {
    e.item.addHandler("fully-loaded-change", (f) => { if (f.fullyLoaded) { body.dataset.ready = "1"; draw(); } });
  });
})();
