// The demo page at /: join an end-to-end-encrypted room with camera and microphone.
//
// The room name and passphrase live in the URL fragment (#room=...&passphrase=...): browsers
// never send the fragment to a server, so sharing the link shares the key material with the
// people you send it to and nobody else. A missing passphrase is generated here (128 random
// bits). Tokens come from the dev-mode endpoint POST /dev/token when the server has it, or are
// pasted (from `sfu token`).
//
// Layout: with others in the call, the active speaker (or, while nobody else speaks, the last
// one) fills a large spotlight tile above a row of small ones. The client watches each remote
// <video> and tells the SFU its size, so the small tiles cost a thumbnail's bandwidth and only
// the spotlight gets the full layer; a video the SFU pauses for lack of bandwidth says so.
//
// Test hooks: with `test=1` in the fragment the page also records the raw media keys it used
// in window.blindfoldTest (tests scan the server's memory for them); `e2ee_api=streams` forces
// the createEncodedStreams transform instead of RTCRtpScriptTransform.

import { BlindfoldError, joinRoom } from './client/blindfold.js';

const ROOM_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const PASSPHRASE_BYTES = 16; // 128 bits; docs/e2ee.md asks for at least 96
// sessionStorage: this tab left a call by being hidden (reload, navigation), with the room's
// name; the next load of the page consumes it and rejoins. Set only on pagehide, so a tab
// duplicated mid-call (which copies sessionStorage) does not join as us and replace us.
const REJOIN_KEY = 'blindfold.rejoin';

/** @param {string} id @returns {any} */
const $ = (id) => {
  const el = document.getElementById(id);
  if (el === null) throw new Error(`demo page: #${id} is missing`);
  return el;
};

/** @type {import('./client/blindfold.js').BlindfoldRoom|null} */
let room = null;
/** The room being joined (between the Join click and the call), or null. @type {string|null} */
let joining = null;
/**
 * Which join the page is on; events of an earlier room object (one being left, or left on
 * pagehide and still finishing after a return from the back/forward cache) are ignored.
 */
let session = 0;
/** The browser can encrypt media frames (no call can be joined without). */
const e2eeSupported = typeof RTCRtpScriptTransform === 'function'
  || typeof RTCRtpSender?.prototype?.createEncodedStreams === 'function';
/** @type {MediaStream|null} */
let localStream = null;
/** The message of the last fatal error, shown when the call ends. @type {string|null} */
let lastFatal = null;
/** The remote participant shown large, or null (alone in the call). @type {string|null} */
let spotlightId = null;
/** Last events, for tests and debugging. @type {Record<string, any>[]} */
const eventLog = [];

// --- the fragment ------------------------------------------------------------------------------

/** @returns {URLSearchParams} */
function fragment() {
  return new URLSearchParams(location.hash.replace(/^#/, ''));
}

/** @param {Record<string, string>} values */
function setFragment(values) {
  const params = fragment();
  for (const [k, v] of Object.entries(values)) params.set(k, v);
  history.replaceState(null, '', `${location.pathname}${location.search}#${params}`);
}

/** @param {number} n @returns {string} base64url of n random bytes */
function randomToken(n) {
  const bytes = crypto.getRandomValues(new Uint8Array(n));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

/** The link to share: room and passphrase, nothing else (no test switches, no name). */
function inviteLink() {
  const params = new URLSearchParams();
  const current = fragment();
  const roomName = $('room-input').value.trim() || current.get('room') || '';
  if (roomName) params.set('room', roomName);
  params.set('passphrase', current.get('passphrase') ?? '');
  return `${location.origin}/#${params}`;
}

const ROOM_WORDS = [
  ['amber', 'brisk', 'calm', 'dusty', 'eager', 'fuzzy', 'gentle', 'hazel', 'ivory', 'jolly',
    'keen', 'lucky', 'mellow', 'nimble', 'olive', 'proud', 'quiet', 'rapid', 'sunny', 'tidy'],
  ['otter', 'heron', 'badger', 'falcon', 'lynx', 'marten', 'newt', 'orca', 'panda', 'quail',
    'raven', 'seal', 'tapir', 'urchin', 'viper', 'walrus', 'yak', 'zebra', 'ibis', 'koala'],
];

/** @returns {string} a readable random room name, e.g. "amber-otter-42" */
function randomRoomName() {
  const [a, b, n] = crypto.getRandomValues(new Uint32Array(3));
  return `${ROOM_WORDS[0][a % ROOM_WORDS[0].length]}-${ROOM_WORDS[1][b % ROOM_WORDS[1].length]}-${10 + (n % 90)}`;
}

/** The room in the link, or a new random one put into the link, so every invite has one. */
function ensureRoom() {
  let roomName = fragment().get('room');
  if (!roomName || !ROOM_RE.test(roomName)) {
    roomName = randomRoomName();
    setFragment({ room: roomName });
  }
  return roomName;
}

function ensurePassphrase() {
  const params = fragment();
  let passphrase = params.get('passphrase');
  if (!passphrase) {
    passphrase = randomToken(PASSPHRASE_BYTES);
    setFragment({ passphrase });
  }
  return passphrase;
}

// --- tokens --------------------------------------------------------------------------------------

/**
 * A token for (roomName, identity): the pasted one, else the dev endpoint's.
 * @param {string} roomName
 * @param {string} identity
 * @param {string} name
 * @returns {Promise<string>}
 */
async function getToken(roomName, identity, name) {
  const pasted = $('token-input').value.trim();
  if (pasted) return pasted;
  let response;
  try {
    const query = new URLSearchParams({ room: roomName, identity });
    response = await fetch(`/dev/token?${query}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ room: roomName, identity, name }),
      cache: 'no-store',
    });
  } catch (err) {
    throw new UserError(`Cannot reach the server to get a token (${err}).`);
  }
  if (response.status === 404 || response.status === 405) {
    $('token-details').open = true;
    throw new UserError('This server does not hand out tokens (it is not in dev mode). '
      + 'Paste an access token for this room below.');
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // handled below
  }
  if (!response.ok || typeof body?.token !== 'string') {
    throw new UserError(`The server refused a token: ${body?.detail ?? response.statusText}`);
  }
  return body.token;
}

/** An error whose message is meant for the person at the screen. */
class UserError extends Error {}

/** @param {string} roomName @returns {string} a per-tab identity, kept across reloads */
function identityFor(roomName) {
  const key = `blindfold.identity.${roomName}`;
  let identity = sessionStorage.getItem(key);
  if (!identity) {
    identity = `guest-${randomToken(6)}`;
    sessionStorage.setItem(key, identity);
  }
  return identity;
}

// --- media ---------------------------------------------------------------------------------------

/** @returns {Promise<MediaStream|null>} camera and microphone, or what is available */
async function getLocalMedia() {
  const video = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 24 } };
  const attempts = [{ audio: true, video }, { audio: true }, { video }];
  let lastError = null;
  for (const constraints of attempts) {
    try {
      return await navigator.mediaDevices.getUserMedia(constraints);
    } catch (err) {
      lastError = err;
      if (err instanceof DOMException && err.name === 'NotAllowedError') break;
    }
  }
  showNotice(`No camera or microphone (${lastError instanceof DOMException ? lastError.name : lastError}): `
    + 'you can still see and hear the others.');
  return null;
}

// --- join and leave ------------------------------------------------------------------------------

/** @param {SubmitEvent} event */
async function onJoin(event) {
  event.preventDefault();
  hideError('join-error');
  const roomName = $('room-input').value.trim();
  const name = $('name-input').value.trim();
  if (!ROOM_RE.test(roomName)) {
    showError('join-error', 'The room name must be 1–64 letters, digits, "_", "." or "-".');
    return;
  }
  if (!name) {
    showError('join-error', 'Please enter your name.');
    return;
  }
  const passphrase = ensurePassphrase();
  setFragment({ room: roomName });
  try { localStorage.setItem('blindfold.name', name); } catch { /* private mode */ }
  const button = $('join-button');
  button.disabled = true;
  button.textContent = 'Joining…';
  const mine = ++session;
  joining = roomName;
  /** @type {MediaStream|null} */
  let media = null;
  /** @type {import('./client/blindfold.js').BlindfoldRoom|null} */
  let joined = null;
  try {
    const token = await getToken(roomName, identityFor(roomName), name);
    media = await getLocalMedia();
    const params = fragment();
    joined = await joinRoom({
      url: location.origin,
      token,
      passphrase,
      room: roomName,
      name,
      media: media ?? undefined,
      onEvent: (/** @type {any} */ e) => { if (session === mine) onEvent(e); },
      recordKeys: params.get('test') === '1',
      transformApi: params.get('e2ee_api') === 'streams' ? 'streams' : 'auto',
      // A media worker or the whole server may die: join again, through another node of the
      // cluster if the server named any, instead of ending the call.
      autoRejoin: true,
    });
  } catch (err) {
    media?.getTracks().forEach((t) => t.stop());
    if (session !== mine) return;
    const message = err instanceof UserError || err instanceof BlindfoldError ? err.message : `Could not join: ${err}`;
    showError('join-error', message);
    return;
  } finally {
    if (session === mine) {
      joining = null;
      resetJoinButton();
    }
  }
  if (session !== mine) {
    // The page was hidden (pagehide) while we were joining: leave straight away.
    joined.leave().catch(() => {});
    media?.getTracks().forEach((t) => t.stop());
    return;
  }
  room = joined;
  localStream = media;
  showCall(roomName, name);
}

function resetJoinButton() {
  const button = $('join-button');
  button.disabled = !e2eeSupported;
  button.textContent = 'Join with camera and microphone';
}

/** The Leave button: the client sends `leave` (the others see us go at once), then closes. */
async function onLeave() {
  const current = room;
  room = null;
  session++;
  try { sessionStorage.removeItem(REJOIN_KEY); } catch { /* private mode */ }
  await current?.leave();
  showJoin();
}

/**
 * The tab is closing, reloading or navigating away: tell the server now, so the others see us
 * leave at once. room.leave() sends `leave` synchronously, before its first await (the rest
 * of it may never run in a page being torn down). A tab that was in a call (or joining one)
 * is marked so that, reloaded, it rejoins by itself.
 */
function onPageHide() {
  const current = room;
  const inCall = current?.roomName ?? joining;
  if (inCall) {
    try { sessionStorage.setItem(REJOIN_KEY, inCall); } catch { /* private mode */ }
  }
  room = null;
  joining = null;
  session++;
  current?.leave().catch(() => {});
}

/**
 * Join again by ourselves after a reload (or a return to this page) when the tab left a call
 * in this room and the link carries room and passphrase: the name is remembered in
 * localStorage. The mark is consumed, so a failed join is not retried in a loop.
 * @param {boolean} linkComplete  the link had both room and passphrase when the page loaded
 */
function rejoinIfReloaded(linkComplete) {
  let mark = null;
  try {
    mark = sessionStorage.getItem(REJOIN_KEY);
    sessionStorage.removeItem(REJOIN_KEY);
  } catch { /* private mode */ }
  const roomName = $('room-input').value.trim();
  if (!linkComplete || mark === null || mark !== roomName || !$('name-input').value.trim()) return;
  if (!e2eeSupported || joining !== null) return;
  $('join-form').requestSubmit();
}

/** @param {string} roomName @param {string} name */
function showCall(roomName, name) {
  $('join-view').hidden = true;
  $('call-view').hidden = false;
  $('call-room').textContent = roomName;
  const local = $('local-tile');
  local.dataset.participant = room?.self?.id ?? '';
  local.querySelector('.name').textContent = `You (${name})`;
  $('local-video').srcObject = localStream;
  local.querySelector('.placeholder').hidden = localStream?.getVideoTracks().length !== 0;
  $('mute-audio').disabled = !localStream?.getAudioTracks().length;
  $('mute-video').disabled = !localStream?.getVideoTracks().length;
  renderPeers();
  showSpeaker(room?.speakers ?? []);
}

function showJoin() {
  $('alone').hidden = true;
  localStream?.getTracks().forEach((t) => t.stop());
  localStream = null;
  for (const tile of document.querySelectorAll('.tile:not(.local)')) tile.remove();
  spotlightId = null;
  chooseSpotlight(null);
  $('local-video').srcObject = null;
  $('call-view').hidden = true;
  $('join-view').hidden = false;
  hideError('call-error');
  $('call-notice').hidden = true;
  setMuteButton('audio', false);
  setMuteButton('video', false);
}

// --- room events ---------------------------------------------------------------------------------

/** @param {import('./client/blindfold.js').RoomEvent} event */
function onEvent(event) {
  const { track: _track, stream: _stream, ...loggable } = event;
  eventLog.push({ at: Date.now(), ...loggable });
  if (eventLog.length > 500) eventLog.shift();
  switch (event.type) {
    case 'joined':
      // A rejoin makes us a new participant: our own tile follows the new id.
      if (event.participant) $('local-tile').dataset.participant = event.participant.id;
      for (const p of event.participants) tileFor(p.id);
      renderPeers();
      chooseSpotlight(null);
      break;
    case 'participant_joined':
      tileFor(event.participant.id);
      renderPeers();
      chooseSpotlight(null);
      break;
    case 'participant_left':
      removeTile(event.participant);
      renderPeers();
      break;
    case 'track': {
      const tile = tileFor(event.participant);
      const video = tile.querySelector('video');
      if (video.srcObject !== event.stream) video.srcObject = event.stream;
      if (event.kind === 'video') {
        tile.querySelector('.placeholder').hidden = true;
        // The tile decides the size (spotlight or thumbnail), so the SFU sends what it shows.
        room?.observeVideoSize(event.trackId, video);
        showVideoLayer(tile, room?.videoLayer(event.trackId) ?? null);
      }
      video.play().catch(() => showNotice('Click anywhere on the page to hear the others.'));
      break;
    }
    case 'track_removed':
      if (room !== null && !room.participants.has(event.participant)) {
        // Their tracks end because they left (participant_left may come just after): the
        // tile goes now, not after a "Camera off" moment.
        removeTile(event.participant);
      } else if (event.kind === 'video') {
        const tile = document.querySelector(`.tile[data-participant="${CSS.escape(event.participant)}"]`);
        if (tile) showVideoLayer(tile, null);
        const placeholder = tile?.querySelector('.placeholder');
        if (placeholder) {
          placeholder.hidden = false;
          placeholder.textContent = 'Camera off';
        }
      }
      break;
    case 'track_muted': {
      const tile = document.querySelector(`.tile[data-participant="${CSS.escape(event.participant)}"]`);
      if (tile && event.kind === 'audio') tile.querySelector('.mic-muted').hidden = !event.muted;
      if (tile && event.kind === 'video') {
        const placeholder = tile.querySelector('.placeholder');
        placeholder.hidden = !event.muted;
        placeholder.textContent = 'Camera off';
      }
      break;
    }
    case 'active_speaker':
      showSpeaker(event.speakers);
      break;
    case 'video_layer': {
      const tile = document.querySelector(`.tile:not(.local)[data-participant="${CSS.escape(event.participant)}"]`);
      if (tile) showVideoLayer(tile, event);
      break;
    }
    case 'peer_verified':
    case 'peer_rejected':
    case 'decrypt_status':
      renderPeer(event.participant);
      renderPeers();
      break;
    case 'send_key':
      $('key-generation').textContent = String(event.generation);
      break;
    case 'connection':
      renderConnection(event.state);
      break;
    case 'rejoined':
      showNotice('The connection to the server was lost; you are back in the call (the others saw you leave and join again).');
      break;
    case 'error':
      if (event.fatal) lastFatal = event.message;
      else showError('call-error', event.message);
      break;
    case 'left':
      if (room !== null) {
        // Not our own leave: the server ended the call, or the connection was lost for good.
        room = null;
        showJoin();
        showError('join-error', `The call ended: ${lastFatal ?? describeReason(event.reason)}`);
      }
      lastFatal = null;
      break;
    default:
      break;
  }
}

/** @param {string[]} speakers  participant ids, loudest first: the first one is highlighted */
function showSpeaker(speakers) {
  for (const tile of document.querySelectorAll('.tile')) {
    tile.classList.toggle('speaking', speakers[0] !== undefined
      && tile.getAttribute('data-participant') === speakers[0]);
  }
  chooseSpotlight(speakers[0] ?? null);
}

/**
 * Show one remote participant large: the one speaking now, else whoever was, else the first
 * to arrive. We never spotlight ourselves (our own speech would hide the others).
 * @param {string|null} speaker  the loudest participant, if any
 */
function chooseSpotlight(speaker) {
  /** @param {string|null} id */
  const remoteTile = (id) => (id === null ? null
    : document.querySelector(`.tile:not(.local)[data-participant="${CSS.escape(id)}"]`));
  const tile = remoteTile(speaker) ?? remoteTile(spotlightId)
    ?? document.querySelector('.tile:not(.local)');
  spotlightId = tile?.getAttribute('data-participant') ?? null;
  for (const other of document.querySelectorAll('.tile')) other.classList.toggle('spotlight', other === tile);
  $('grid').classList.toggle('has-spotlight', tile !== null);
}

/**
 * The "paused" badge of a remote tile, from the SFU's latest video_layer report (null: none,
 * the video flows). A video paused because we asked for none (size) needs no badge.
 * @param {Element} tile
 * @param {{paused: boolean, reason: string|null}|null} state
 */
function showVideoLayer(tile, state) {
  const paused = state?.paused === true && state.reason !== 'size';
  const badge = tile.querySelector('.video-paused');
  badge.hidden = !paused;
  badge.textContent = state?.reason === 'bandwidth' ? 'paused: low bandwidth' : 'video paused';
  tile.classList.toggle('paused', paused);
}

/** @param {string} reason */
function describeReason(reason) {
  return reason === 'connection lost' ? 'the connection to the server was lost.' : `${reason}.`;
}

/** @param {string} state */
function renderConnection(state) {
  const el = $('connection-status');
  el.textContent = { connected: 'connected', reconnecting: 'reconnecting…', closed: 'disconnected' }[state] ?? state;
  el.className = `pill ${state}`;
}

/**
 * The tile of a remote participant, created on first use.
 * @param {string} id
 * @returns {HTMLElement}
 */
function tileFor(id) {
  let tile = document.querySelector(`.tile[data-participant="${CSS.escape(id)}"]`);
  if (tile === null) {
    const template = /** @type {HTMLTemplateElement} */ ($('tile-template'));
    tile = /** @type {HTMLElement} */ (template.content.firstElementChild.cloneNode(true));
    tile.dataset.participant = id;
    $('grid').append(tile);
  }
  renderPeer(id, /** @type {HTMLElement} */ (tile));
  return /** @type {HTMLElement} */ (tile);
}

/** @param {string} id  a remote participant whose tile goes (they left) */
function removeTile(id) {
  const tile = document.querySelector(`.tile:not(.local)[data-participant="${CSS.escape(id)}"]`);
  if (tile === null) return;
  const video = tile.querySelector('video');
  if (video) video.srcObject = null;
  tile.remove();
  if (spotlightId === id) spotlightId = null;
  chooseSpotlight(null);
}

/** @param {string} id */
function displayName(id) {
  const p = room?.participants.get(id);
  if (!p) return 'someone';
  if (p.kind === 'whip') return `stream ${p.identity}`;
  return p.name || p.identity;
}

/**
 * Name, verification badge and the "cannot decrypt" banner of one tile.
 * @param {string} id
 * @param {HTMLElement|null} [tileElement]
 */
function renderPeer(id, tileElement = null) {
  const tile = tileElement ?? document.querySelector(`.tile[data-participant="${CSS.escape(id)}"]`);
  if (!tile) return;
  const name = displayName(id);
  tile.querySelector('.name').textContent = name;
  const peer = room?.peerStatus()[id];
  const participant = room?.participants.get(id);
  const badge = tile.querySelector('.verify');
  const banner = tile.querySelector('.banner');
  let problem = null;
  if (participant?.kind === 'whip') {
    badge.textContent = 'not in key exchange';
    badge.className = 'badge verify unverified';
  } else if (peer?.verified) {
    badge.textContent = 'verified';
    badge.className = 'badge verify verified';
  } else if (peer?.rejected) {
    badge.textContent = 'not verified';
    badge.className = 'badge verify rejected';
    problem = `${name} could not be verified (${peer.rejected}): you probably have different passphrases (different links).`;
  } else {
    badge.textContent = 'verifying…';
    badge.className = 'badge verify pending';
  }
  const cannotDecrypt = peer?.status === 'cannot-decrypt';
  if (cannotDecrypt) {
    problem = `Cannot decrypt ${name}'s media. ${peer?.rejected
      ? `You and ${name} probably have different passphrases (different links).`
      : 'Their key has not reached you (yet).'}`;
  }
  tile.classList.toggle('cannot-decrypt', cannotDecrypt);
  tile.dataset.decrypt = peer?.status ?? 'waiting';
  banner.hidden = problem === null;
  banner.textContent = problem ?? '';
}

function renderPeers() {
  if (room === null) return;
  const list = $('peer-list');
  list.replaceChildren();
  const status = room.peerStatus();
  for (const [id, p] of room.participants) {
    const li = document.createElement('li');
    const s = status[id];
    let state = 'verifying…';
    if (p.kind === 'whip') state = 'WHIP stream, not in the key exchange';
    else if (s?.verified) state = 'verified';
    else if (s?.rejected) state = `not verified (${s.rejected})`;
    if (s?.status === 'cannot-decrypt') state += ', cannot decrypt';
    li.textContent = `${displayName(id)} — ${state}`;
    li.dataset.participant = id;
    list.append(li);
  }
  const alone = room.participants.size === 0;
  if (alone) {
    const li = document.createElement('li');
    li.textContent = 'Nobody else yet: share the invite link.';
    list.append(li);
  }
  $('alone').hidden = !alone;
  // The link as it will be pasted, but with the passphrase masked: the screen may be seen
  // (or shared) by others. The copy button copies the whole link.
  if (alone) $('alone-link').textContent = inviteLink().replace(/passphrase=[^&]*/, 'passphrase=••••••');
}

// --- controls --------------------------------------------------------------------------------

/** @param {'audio'|'video'} kind @param {boolean} muted */
function setMuteButton(kind, muted) {
  const button = $(kind === 'audio' ? 'mute-audio' : 'mute-video');
  button.setAttribute('aria-pressed', String(muted));
  if (kind === 'audio') button.textContent = muted ? 'Unmute mic' : 'Mute mic';
  else button.textContent = muted ? 'Start camera' : 'Stop camera';
}

/** @param {'audio'|'video'} kind */
function toggleMute(kind) {
  if (room === null) return;
  const muted = !room.isMuted(kind);
  room.setMuted(kind, muted);
  setMuteButton(kind, muted);
  const local = $('local-tile');
  if (kind === 'audio') local.querySelector('.mic-muted').hidden = !muted;
  else local.querySelector('.placeholder').hidden = !muted;
}

/** @param {string} statusId */
async function copyInvite(statusId) {
  const link = inviteLink();
  try {
    await navigator.clipboard.writeText(link);
    if (statusId) $(statusId).textContent = 'Link copied.';
    else showNotice('Invite link copied.');
  } catch {
    // No clipboard permission (e.g. plain http on another host): show it to copy by hand.
    window.prompt('Copy this invite link:', link);
  }
}

// --- messages --------------------------------------------------------------------------------

/** @param {string} id @param {string} message */
function showError(id, message) {
  const el = $(id);
  el.textContent = message;
  el.hidden = false;
}

/** @param {string} id */
function hideError(id) {
  const el = $(id);
  el.hidden = true;
  el.textContent = '';
}

/** @param {string} message */
function showNotice(message) {
  const el = $('call-notice');
  el.textContent = message;
  el.hidden = false;
}

// --- test hooks ------------------------------------------------------------------------------

/**
 * Mean colour of the four quadrants of a <video> (inner half of each, away from the edges
 * the encoder blurs), as [[r, g, b] top-left, top-right, bottom-left, bottom-right].
 * @param {string} who  'local' or a participant id
 */
function sampleVideo(who) {
  const video = who === 'local'
    ? $('local-video')
    : document.querySelector(`.tile[data-participant="${CSS.escape(who)}"] video`);
  if (!video || video.videoWidth === 0) return null;
  const w = 64;
  const h = 48;
  const canvas = document.createElement('canvas');
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(video, 0, 0, w, h);
  const px = ctx.getImageData(0, 0, w, h).data;
  const quadrants = [];
  for (const [qx, qy] of [[0, 0], [1, 0], [0, 1], [1, 1]]) {
    const sum = [0, 0, 0];
    let n = 0;
    for (let y = qy * h / 2 + h / 8; y < qy * h / 2 + 3 * h / 8; y++) {
      for (let x = qx * w / 2 + w / 8; x < qx * w / 2 + 3 * w / 8; x++) {
        const i = (y * w + x) * 4;
        for (let c = 0; c < 3; c++) sum[c] += px[i + c];
        n++;
      }
    }
    quadrants.push(sum.map((s) => Math.round(s / n)));
  }
  return { width: video.videoWidth, height: video.videoHeight, quadrants };
}

/** What tests (tests/browser/) read from the page. */
window.blindfoldTest = {
  get joined() { return room !== null && room.state === 'connected'; },
  get state() { return room?.state ?? 'idle'; },
  get self() { return room?.self ?? null; },
  get transformApi() { return room?.transformApi ?? null; },
  participants: () => (room ? [...room.participants.values()] : []),
  stats: () => room?.getStats() ?? null,
  peers: () => room?.peerStatus() ?? {},
  sendKeys: () => room?.sendKeys ?? [],
  /** Raw media keys (hex) used so far; only with test=1 in the fragment. */
  keys: () => room?.keyLog ?? [],
  speakers: () => room?.speakers ?? [],
  /** The remote participant in the large tile, or null. */
  spotlight: () => spotlightId,
  /** Per remote video track: the size asked of the SFU and its last video_layer report. */
  videos: () => {
    if (room === null) return {};
    /** @type {Record<string, any>} */
    const out = {};
    for (const [id, track] of room.tracks) {
      if (track.kind !== 'video' || track.participant === room.self?.id) continue;
      out[id] = { participant: track.participant, size: room.videoSize(id), layer: room.videoLayer(id) };
    }
    return out;
  },
  events: () => eventLog.slice(),
  sampleVideo,
  leave: () => onLeave(),
  dropConnection: () => room?.dropConnection(),
  setMuted: (/** @type {'audio'|'video'} */ kind, /** @type {boolean} */ muted) => {
    if (room !== null && room.isMuted(kind) !== muted) toggleMute(kind);
  },
};

// --- start -----------------------------------------------------------------------------------

function init() {
  const link = fragment();
  const linkComplete = ROOM_RE.test(link.get('room') ?? '') && Boolean(link.get('passphrase'));
  ensurePassphrase();
  const roomName = ensureRoom();
  $('room-input').value = roomName;
  try {
    const savedName = localStorage.getItem('blindfold.name');
    if (savedName) $('name-input').value = savedName;
  } catch { /* private mode */ }
  // Typing another room name keeps the link (and so the invite) in step with it.
  $('room-input').addEventListener('input', () => {
    const typed = $('room-input').value.trim();
    if (ROOM_RE.test(typed)) setFragment({ room: typed });
  });
  window.addEventListener('pagehide', onPageHide);
  window.addEventListener('pageshow', (event) => {
    if (!event.persisted) return;
    // Back from the back/forward cache: the call was left on pagehide; join it again.
    if (room === null && !$('call-view').hidden) showJoin();
    resetJoinButton();
    rejoinIfReloaded(true);
  });
  $('copy-link-alone').addEventListener('click', () => copyInvite('alone-status'));
  $('join-form').addEventListener('submit', onJoin);
  $('leave-button').addEventListener('click', onLeave);
  $('mute-audio').addEventListener('click', () => toggleMute('audio'));
  $('mute-video').addEventListener('click', () => toggleMute('video'));
  $('copy-link').addEventListener('click', () => copyInvite('copy-status'));
  $('copy-link-call').addEventListener('click', () => copyInvite(''));
  $('toggle-passphrase').addEventListener('click', () => {
    const view = $('passphrase-view');
    view.textContent = fragment().get('passphrase') ?? '';
    view.hidden = !view.hidden;
    $('toggle-passphrase').textContent = view.hidden ? 'show' : 'hide';
    $('toggle-passphrase').setAttribute('aria-expanded', String(!view.hidden));
  });
  // Someone pasted a different link into this tab: follow it.
  window.addEventListener('hashchange', () => {
    if (room !== null) return;
    $('room-input').value = ensureRoom();
    ensurePassphrase();
  });
  document.addEventListener('click', () => {
    for (const v of document.querySelectorAll('.tile:not(.local) video')) {
      if (v.paused && v.srcObject) v.play().catch(() => {});
    }
  });
  if (!e2eeSupported) {
    showError('join-error', 'This browser cannot encrypt media frames (no WebRTC encoded transforms). '
      + 'Blindfold calls are always end-to-end encrypted: please use a recent Chrome, Edge, Firefox or Safari.');
    $('join-button').disabled = true;
    return;
  }
  rejoinIfReloaded(linkComplete);
}

init();
