// Blindfold's browser client: one participant of an end-to-end-encrypted room.
//
// It speaks the room protocol of docs/protocol.md (version 1) over the WebSocket at /rtc:
// join (following a cluster's redirect to the room's node; resume after a dropped socket;
// with `autoRejoin`, a fresh join when the media or the node is gone), a publisher
// RTCPeerConnection this client offers (publish_offer -> publish_answer), a subscriber
// RTCPeerConnection the SFU offers and renegotiates (subscribe_offer -> subscribe_answer,
// a=setup:active), mute and leave.
//
// E2EE is always on and cannot be turned off: every outgoing frame is protected with SFrame in
// one module worker (../e2ee/worker.js) before it leaves the browser, and every incoming frame
// must authenticate before it reaches the decoder. The media keys come from the passphrase-
// authenticated key exchange (../e2ee/keyexchange.js) over the SFU's blind relay; the SFU
// never sees a key or the passphrase. See docs/e2ee.md sections 11 and 12.
//
// No build step: load it as an ES module.
//
//   import { joinRoom } from '/client/client/blindfold.js';
//   const room = await joinRoom({ token, passphrase, name: 'Ada', media: stream,
//                                 onEvent: (event) => console.log(event.type, event) });
//   room.setMuted('audio', true);
//   await room.leave();
//
// Video is published as three simulcast layers (SIMULCAST_LAYERS, `simulcast: false` for one
// encoding); the app tells the SFU how large it shows each remote video (setVideoSize, or
// observeVideoSize on the <video> element) so that it forwards no bigger layer than that, and
// hears back which layer it gets or why the video is paused (the `video_layer` event).
// docs/client.md describes the API.

import { KeyExchange } from '../e2ee/keyexchange.js';

export const PROTOCOL_VERSION = 1;

/** How long the server keeps a dropped participant (rooms.reconnect_window default). */
const DEFAULT_RECONNECT_WINDOW_MS = 20000;
/** How long to wait for `joined`, `publish_answer` and the like. */
const REQUEST_TIMEOUT_MS = 10000;
// Redirects followed per join: a cluster in `redirect` mode sends a join on to the room's node
// once (a room moves at most once between two looks at Redis).
const MAX_REDIRECTS = 3;
// Between rejoin attempts while no node takes the join: a dead node's rooms are placed afresh
// within cluster.node_ttl (at most 5 s), so the last delay repeats until REJOIN_FOR_MS has
// passed. The Python client (sfu/client/room.py) keeps the same schedule.
const REJOIN_DELAYS_MS = [0, 250, 500];
const REJOIN_FOR_MS = 30000;
/** Refusals that no other node or later attempt can change: the token, this browser or our
 * offer is the problem, so a rejoin gives up at once instead of retrying for half a minute. */
const REJOIN_HOPELESS = new Set([
  'missing_token', 'invalid_token', 'unknown_key', 'token_expired', 'token_not_yet_valid',
  'unsupported_version', 'codec_not_supported', 'e2ee_unsupported', 'no_slot',
  'invalid_sdp', 'no_publish_grant', 'no_usable_media', 'bundle_required', 'too_many_tracks',
]);
/** Stats intervals (1 s each) of failures without a single good frame before a peer's media
 * counts as undecryptable: a joiner's first frames may legitimately arrive before its key. */
const CANNOT_DECRYPT_AFTER = 2;
/** How long a watched <video> must keep a new size before it is sent: a window being dragged
 * or a layout animating would otherwise send a message per frame. */
const VIDEO_SIZE_DEBOUNCE_MS = 250;
/** The largest width or height setVideoSize accepts, as the server does (no camera comes near it). */
const MAX_VIDEO_DIMENSION = 16384;

/**
 * The video encodings published by default, lowest first: the SFU reads the order of
 * `a=simulcast:send` as lowest to highest. Each layer halves the one above in width and
 * height; the bitrate ceilings give VP8 a clean picture at that size from a 1280x720 camera
 * (320x180, 640x360, 1280x720), so a thumbnail costs a subscriber a tenth of the full layer.
 * The scale is spelled out on every layer, so that a rid always names the same scale when
 * a smaller camera leaves the lowest layers out (sendEncodings).
 */
export const SIMULCAST_LAYERS = Object.freeze([
  Object.freeze({ rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 }),
  Object.freeze({ rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 }),
  Object.freeze({ rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1_500_000 }),
]);

/**
 * How many simulcast layers Chromium encodes from a camera of this size: 3 from 960x540
 * pixels up, 2 from 480x270, else 1 (compared by pixel count, so 640x480 gets 2). Beyond
 * that it silently drops the top layers, the full-resolution one first; measured in
 * Chromium 156.
 * @param {number} width
 * @param {number} height
 * @returns {number}
 */
export function simulcastLayerLimit(width, height) {
  const pixels = width * height;
  if (pixels >= 960 * 540) return 3;
  if (pixels >= 480 * 270) return 2;
  return 1;
}

/**
 * The `sendEncodings` for a new video transceiver, or undefined for the browser's single
 * default encoding (audio, video with simulcast off, and a camera too small for two layers).
 * @param {'audio'|'video'} kind
 * @param {boolean|ReadonlyArray<RTCRtpEncodingParameters>} [simulcast]  true (the default):
 *   SIMULCAST_LAYERS; false: one encoding; or the layers themselves, lowest first
 * @param {{width?: number, height?: number}} [size]  the camera's size (track.getSettings()),
 *   when known: the lowest layers are left out so that the browser keeps the full-resolution
 *   one (see simulcastLayerLimit)
 * @returns {RTCRtpEncodingParameters[]|undefined}
 */
export function sendEncodings(kind, simulcast = true, size = {}) {
  if (kind !== 'video' || simulcast === false) return undefined;
  const layers = simulcast === true ? SIMULCAST_LAYERS : simulcast;
  if (!Array.isArray(layers) || layers.length === 0) {
    throw new BlindfoldError('invalid_option', 'simulcast must be true, false or a non-empty list of layers');
  }
  const rids = new Set();
  for (const layer of layers) {
    // RFC 8851 allows more, but browsers and the SFU's SDP parser agree on these.
    if (typeof layer?.rid !== 'string' || !/^[A-Za-z0-9]{1,16}$/.test(layer.rid) || rids.has(layer.rid)) {
      throw new BlindfoldError('invalid_option', `every simulcast layer needs its own rid of 1-16 letters and digits (got ${JSON.stringify(layer?.rid)})`);
    }
    rids.add(layer.rid);
  }
  let kept = layers;
  if (Number.isFinite(size.width) && Number.isFinite(size.height)) {
    const limit = simulcastLayerLimit(/** @type {number} */ (size.width), /** @type {number} */ (size.height));
    if (limit === 1) return undefined;
    kept = layers.slice(Math.max(0, layers.length - limit));
  }
  // Copies: the browser may keep what it is given, and the defaults are frozen.
  return kept.map((layer) => ({ ...layer }));
}

/**
 * Whether the answer to our publish offer accepted simulcast for the section `mid`
 * (`a=simulcast:recv` there). Without it the browser sends only the first encoding.
 * @param {string} sdp
 * @param {string} mid
 * @returns {boolean}
 */
export function simulcastAccepted(sdp, mid) {
  for (const section of sdp.split(/\r?\nm=/).slice(1)) {
    if (/^a=mid:(\S+)/m.exec(section)?.[1] !== mid) continue;
    return /^a=simulcast:\s*recv\s/m.test(section);
  }
  return false;
}

/**
 * The room-protocol message asking the SFU to forward no larger video than `width` x
 * `height` for a track; (0, 0) says the app shows no video for it.
 * @param {string} trackId
 * @param {number} width
 * @param {number} height
 * @returns {{type: 'video_size', track: string, width: number, height: number}}
 */
export function videoSizeMessage(trackId, width, height) {
  if (typeof trackId !== 'string' || trackId === '') {
    throw new BlindfoldError('invalid_argument', 'setVideoSize needs a track id');
  }
  const valid = (/** @type {unknown} */ v) => Number.isInteger(v) && /** @type {number} */ (v) >= 0
    && /** @type {number} */ (v) <= MAX_VIDEO_DIMENSION;
  if (!valid(width) || !valid(height)) {
    throw new BlindfoldError('invalid_argument', `width and height must be whole numbers from 0 to ${MAX_VIDEO_DIMENSION} (got ${width} x ${height})`);
  }
  // One zero would ask for a picture with no area: the server could only guess what was meant.
  if ((width === 0) !== (height === 0)) {
    throw new BlindfoldError('invalid_argument', `width and height must both be 0 (no video) or both positive (got ${width} x ${height})`);
  }
  return { type: 'video_size', track: trackId, width, height };
}

/**
 * The state of one subscribed video as the server's `video_layer` message gives it, or null
 * when the message is malformed (it is then ignored).
 * @param {any} message
 * @returns {VideoLayerState|null}
 */
export function parseVideoLayer(message) {
  if (typeof message?.track !== 'string' || typeof message.paused !== 'boolean') return null;
  const reason = ['bandwidth', 'size', 'publisher'].includes(message.reason) ? message.reason : null;
  const raw = message.layer;
  let layer = null;
  if (raw !== null && raw !== undefined) {
    if (typeof raw !== 'object' || typeof raw.rid !== 'string') return null;
    layer = {
      rid: raw.rid,
      width: Number.isInteger(raw.width) ? raw.width : null,
      height: Number.isInteger(raw.height) ? raw.height : null,
    };
  }
  const estimate = message.bandwidth_estimate;
  const bandwidthEstimate = Number.isFinite(estimate) && estimate >= 0 ? estimate : null;
  return { trackId: message.track, paused: message.paused, reason, layer, bandwidthEstimate };
}

/**
 * @typedef {Object} VideoLayerState
 * @property {string} trackId
 * @property {boolean} paused  the SFU forwards none of this video
 * @property {'bandwidth'|'size'|'publisher'|null} reason  why it is paused or on this layer:
 *   our link's bandwidth, the size we asked for (0 x 0: no video), or the publisher stopped
 *   sending the layer we had
 * @property {number|null} bandwidthEstimate  the SFU's estimate of our bandwidth (bit/s), or
 *   null when it has none
 * @property {{rid: string, width: number|null, height: number|null}|null} layer  the layer
 *   forwarded, when one is
 */

/** Error codes the server answers a publish_offer with. */
const PUBLISH_ERRORS = new Set([
  'invalid_sdp', 'no_publish_grant', 'no_usable_media', 'bundle_required', 'too_many_tracks',
]);

/** Human-readable explanations of the room protocol's error codes (docs/protocol.md). */
export const ERROR_MESSAGES = Object.freeze({
  join_required: 'The client did not join properly (a bug).',
  join_timeout: 'The server timed out waiting for the join.',
  unsupported_version: 'This page speaks another protocol version than the server.',
  missing_token: 'No access token was given.',
  invalid_token: 'The access token is not valid for this server.',
  unknown_key: 'The access token was signed with a key this server does not know.',
  token_expired: 'The access token has expired: get a new one.',
  token_not_yet_valid: 'The access token is not valid yet (check the clocks).',
  resume_failed: 'The connection was lost for too long: join again.',
  room_full: 'The room is full.',
  limit_reached: 'The server has reached its room limit.',
  draining: 'The server is shutting down: try again shortly.',
  replaced: 'You joined this room again from another tab or device.',
  no_publish_grant: 'This token does not allow publishing camera or microphone.',
  no_subscribe_grant: 'This token does not allow receiving media.',
  no_usable_media: 'The server could not use any of the offered media.',
  too_many_tracks: 'Too many tracks for this server.',
  transport_closed: 'A media connection closed.',
  e2ee_required: 'The server stopped your media: it did not look end-to-end encrypted.',
  codec_not_supported: 'This browser cannot decode a participant\'s codec.',
  rate_limited: 'Too many messages: slow down.',
});

/**
 * @typedef {Object} JoinOptions
 * @property {string} token  access token (a JWT from `sfu token` or the dev endpoint)
 * @property {string} passphrase  the room passphrase (from the URL fragment); never sent anywhere
 * @property {string} [url]  the server: http(s)://host[:port] or ws(s)://host[:port]/rtc;
 *   default: this page's origin
 * @property {string} [room]  the room name; default: the token's `room` claim. The key exchange
 *   binds the keys to it, so every participant must use the same one
 * @property {string} [name]  display name shown to the others
 * @property {MediaStream} [media]  local camera/microphone to publish (video must be VP8-able)
 * @property {boolean|RTCRtpEncodingParameters[]} [simulcast]  publish video as the three
 *   layers of SIMULCAST_LAYERS (true, the default), as one encoding (false), or as the given
 *   layers, lowest first. Every layer's frames are end-to-end encrypted
 * @property {(event: RoomEvent) => void} [onEvent]  every event the room emits
 * @property {URL|string} [workerUrl]  the E2EE worker; default: ../e2ee/worker.js next to this file
 * @property {'auto'|'script'|'streams'} [transformApi]  RTCRtpScriptTransform ('script'),
 *   createEncodedStreams ('streams') or whichever the browser has ('auto', the default)
 * @property {boolean} [recordKeys]  keep every media key used, as hex, for tests that check the
 *   server never saw them (window.blindfoldTest). Off by default: keys should not linger
 * @property {number} [reconnectWindowMs]  how long to try resuming after the socket drops
 * @property {boolean} [autoRejoin]  join the room afresh by itself when a media connection is
 *   gone (`transport_closed`: the SFU's media worker for it died) or the socket dropped and
 *   cannot be resumed (`resume_failed`, or its node is unreachable: the node died). A dropped
 *   socket is still resumed first. The rejoin tries the current URL, then `url` and
 *   `fallbackUrls` in turn, for up to 30 s, publishes `media` again on a new connection and
 *   takes a new receiving connection; the others see us leave and join again. It emits
 *   `rejoined`, or a fatal `rejoin_failed` error when it gives up. Off by default
 * @property {string[]} [fallbackUrls]  other servers (as `url`) a rejoin may join through,
 *   e.g. the other nodes of a cluster. A cluster also names its live nodes in `joined`; they
 *   are tried after these
 * @property {number} [kxIterations]  PBKDF2 iterations of the key exchange: tests only
 */

/**
 * Everything the room reports. `type` is one of:
 * - `joined` {participant, participants, tracks, resumed}
 * - `participant_joined` / `participant_left` {participant}
 * - `track` {participant, kind, trackId, track, stream}: remote media to show
 * - `track_removed` {participant, kind, trackId}
 * - `track_muted` {participant, trackId, muted}
 * - `active_speaker` {speakers}: participant ids, loudest first (may include our own id)
 * - `video_layer` {participant, trackId, paused, reason, layer}: the SFU paused or resumed a
 *   video we receive, or changed its layer (see VideoLayerState)
 * - `peer_verified` {participant}: proved the passphrase and got our key
 * - `peer_rejected` {participant, reason}: cannot be verified (probably another passphrase)
 * - `decrypt_status` {participant, status, counts}: status is `ok`, `cannot-decrypt` or `waiting`
 * - `send_key` {kid, generation}: our frames are protected with a new key generation
 * - `receive_key` {participant, kid}: a peer's key arrived
 * - `connection` {state}: `connected`, `reconnecting`, `closed`
 * - `rejoined` {reason, node}: with `autoRejoin`, we joined afresh (as a new participant, with
 *   a new id and slot) through `node` (its socket URL) and published our media again
 * - `error` {code, message, fatal}; `rejoin_failed` (fatal) when `autoRejoin` gave up
 * - `left` {reason}
 * @typedef {{type: string, [field: string]: any}} RoomEvent
 */

/**
 * @typedef {Object} Participant
 * @property {string} id
 * @property {string} identity
 * @property {string|null} name
 * @property {'rtc'|'whip'} kind
 * @property {number} [slot]
 */

/**
 * @typedef {Object} TrackInfo
 * @property {string} id
 * @property {string} participant
 * @property {'audio'|'video'} kind
 * @property {string} codec
 * @property {string} stream
 * @property {boolean} muted
 */

/**
 * Join a room and return the connected {@link BlindfoldRoom}. Rejects with a
 * {@link BlindfoldError} when the server refuses (bad token, room full, ...) or cannot be
 * reached.
 * @param {JoinOptions} options
 * @returns {Promise<BlindfoldRoom>}
 */
export async function joinRoom(options) {
  const room = new BlindfoldRoom(options);
  await room.join();
  return room;
}

/** A refusal by the server (an `error` message) or a failure of this client. */
export class BlindfoldError extends Error {
  /**
   * @param {string} code  a protocol error code (docs/protocol.md) or a client one
   * @param {string} message
   * @param {boolean} [fatal]
   */
  constructor(code, message, fatal = false) {
    super(message);
    this.name = 'BlindfoldError';
    this.code = code;
    this.fatal = fatal;
  }
}

/**
 * The room claim of a JWT, read without verifying it (the server verifies; we only need the
 * room name for the key exchange).
 * @param {string} token
 * @returns {string|null}
 */
export function roomFromToken(token) {
  try {
    const part = token.split('.')[1];
    const json = atob(part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '='));
    const claims = JSON.parse(json);
    return typeof claims.room === 'string' ? claims.room : null;
  } catch {
    return null;
  }
}

/**
 * The WebSocket URL of the room protocol for a server URL.
 * @param {string} url
 * @returns {string}
 */
export function socketUrl(url) {
  const parsed = new URL(url, globalThis.location?.href);
  if (parsed.protocol === 'http:') parsed.protocol = 'ws:';
  else if (parsed.protocol === 'https:') parsed.protocol = 'wss:';
  if (!parsed.pathname.endsWith('/rtc')) parsed.pathname = `${parsed.pathname.replace(/\/$/, '')}/rtc`;
  parsed.hash = '';
  return parsed.toString();
}

/**
 * mid -> SFU track id of each m-section of a subscriber offer (from `a=msid:<stream> <track>`).
 * @param {string} sdp
 * @returns {Map<string, string>}
 */
export function tracksByMid(sdp) {
  const out = new Map();
  for (const section of sdp.split(/\r?\nm=/).slice(1)) {
    const mid = /^a=mid:(\S+)/m.exec(section)?.[1];
    const track = /^a=msid:\S+ (\S+)/m.exec(section)?.[1];
    if (mid !== undefined && track !== undefined) out.set(mid, track);
  }
  return out;
}

/** @param {Uint8Array} bytes */
const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
/** @param {bigint} kid */
const kidHex = (kid) => `0x${kid.toString(16)}`;
/** @param {number} ms */
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

/**
 * One participant in one room. Create it with {@link joinRoom}.
 */
export class BlindfoldRoom {
  /** @param {JoinOptions} options */
  constructor(options) {
    if (!options || typeof options.token !== 'string' || options.token === '') {
      throw new BlindfoldError('missing_token', 'joinRoom needs an access token');
    }
    if (typeof options.passphrase !== 'string' || options.passphrase === '') {
      throw new BlindfoldError('missing_passphrase', 'joinRoom needs the room passphrase (E2EE is always on)');
    }
    const tokenRoom = roomFromToken(options.token);
    const roomName = options.room ?? tokenRoom;
    if (!roomName) throw new BlindfoldError('invalid_token', 'the token names no room; pass options.room');
    if (tokenRoom !== null && options.room !== undefined && tokenRoom !== options.room) {
      throw new BlindfoldError('wrong_room', `the token is for room "${tokenRoom}", not "${options.room}"`);
    }
    /** @readonly */ this.roomName = roomName;
    /** @private */ this.options = options;
    /** @private */ this.url = socketUrl(options.url ?? globalThis.location.origin);
    /** @private */ this.onEvent = options.onEvent ?? (() => {});
    /** @private */ this.reconnectWindowMs = options.reconnectWindowMs ?? DEFAULT_RECONNECT_WINDOW_MS;
    const fallbacks = options.fallbackUrls ?? [];
    if (!Array.isArray(fallbacks) || fallbacks.some((u) => typeof u !== 'string' || u === '')) {
      throw new BlindfoldError('invalid_option', 'fallbackUrls must be a list of server URLs');
    }
    /** @private Where a rejoin may start: a redirect moves this.url to the room's node, and
     * when that node dies these are how the room is found again. */
    this.entryUrls = [...new Set([this.url, ...fallbacks.map(socketUrl)])];

    /** Our participant as the server describes it (after join). @type {Participant|null} */
    this.self = null;
    /** Everyone else, by id. @type {Map<string, Participant>} */
    this.participants = new Map();
    /** Every track in the room (ours too), by SFU track id. @type {Map<string, TrackInfo>} */
    this.tracks = new Map();
    /** Remote media per participant id. @type {Map<string, MediaStream>} */
    this.streams = new Map();
    /** Current dominant-speaker list. @type {string[]} */
    this.speakers = [];
    /** 'new' | 'connected' | 'reconnecting' | 'closed' */
    this.state = 'new';
    /** Which encoded-transform API is in use. @type {'script'|'streams'} */
    this.transformApi = pickTransformApi(options.transformApi ?? 'auto');

    /** @private @type {WebSocket|null} */ this.ws = null;
    /** @private */ this.resumeToken = '';
    /** @private */ this.leaving = false;
    /** @private Set once join() has finished: a failure before that fails the join instead. */
    this.established = false;
    /** @private @type {Promise<void>|null} */ this.rejoining = null;
    /** @private @type {string|null} why to rejoin once the resume under way has succeeded */
    this.rejoinAfterResume = null;
    /** @private @type {RTCPeerConnection|null} */ this.publisher = null;
    /** @private @type {RTCPeerConnection|null} */ this.subscriber = null;
    /** @private @type {RTCIceServer[]} */ this.iceServers = [];
    /** @private @type {Promise<void>} */ this.subscriberQueue = Promise.resolve();
    /** @private @type {Map<string, string>} mid -> SFU track id */ this.midTracks = new Map();
    /** @private @type {WeakMap<RTCRtpReceiver, {label: number, trackId: string|null}>} */ this.transformed = new WeakMap();
    /** @private */ this.nextLabel = 1;
    /** @private @type {{resolve: (m: any) => void, reject: (e: Error) => void}|null} */
    this.pendingPublish = null;
    /** @private @type {Record<string, string>} kind -> our SFU track id */ this.ownTracks = {};
    /** @private @type {Record<string, boolean>} */ this.muted = { audio: false, video: false };
    /** @private @type {Map<string, {width: number, height: number}>} track id -> wanted size */
    this.videoSizes = new Map();
    /** @private @type {Map<string, () => void>} track id -> stop watching its <video> */
    this.sizeWatchers = new Map();
    /** @private False once the server said it does not know `video_size` (an older SFU). */
    this.videoSizeSupported = true;
    /** Layer and pause state of received videos, by track id, as the SFU last reported it.
     * @type {Map<string, VideoLayerState>} */
    this.videoLayers = new Map();
    /** @private @type {KeyExchange|null} */ this.kx = null;
    /** @private @type {Worker|null} */ this.worker = null;
    /** @private */ this.workerStats = null;
    /** @private @type {Map<string, PeerE2ee>} */ this.peerE2ee = new Map();
    /** Generations of our own send key, oldest first. @type {{kid: string, generation: number, at: number}[]} */
    this.sendKeys = [];
    /** With options.recordKeys: every media key used, as hex. @type {{direction: 'send'|'receive', participant: string, kid: string, key: string}[]} */
    this.keyLog = [];
  }

  // --- public API ----------------------------------------------------------------------------

  /**
   * Connect, join, start the key exchange and publish `options.media`.
   * @returns {Promise<void>}
   */
  async join() {
    if (this.state !== 'new') throw new BlindfoldError('already_joined', 'join() runs once');
    this.startWorker();
    try {
      const joined = await this.connect(false);
      this.applyJoined(joined);
      this.setState('connected');
      this.startKeyExchange();
      await this.kx?.start();
      if (this.options.media && this.options.media.getTracks().length > 0) {
        await this.publish(this.options.media);
      }
      this.established = true;
    } catch (err) {
      // Leave rather than linger half-joined (the others would see a silent member).
      this.leaving = true;
      this.send({ type: 'leave' });
      this.shutdown('join failed');
      throw err;
    }
  }

  /**
   * Mute or unmute our microphone ('audio') or camera ('video'). Muted tracks keep sending
   * (silence or black frames, still encrypted) so unmuting needs no renegotiation; the others
   * are told through the room's `mute` message.
   * @param {'audio'|'video'} kind
   * @param {boolean} muted
   */
  setMuted(kind, muted) {
    this.muted[kind] = muted;
    for (const track of this.options.media?.getTracks() ?? []) {
      if (track.kind === kind) track.enabled = !muted;
    }
    const trackId = this.ownTracks[kind];
    if (trackId !== undefined) this.send({ type: 'mute', track: trackId, muted });
  }

  /** @param {'audio'|'video'} kind */
  isMuted(kind) {
    return this.muted[kind] === true;
  }

  /**
   * Tell the SFU how large we show a remote video, in pixels: it forwards the smallest
   * simulcast layer at least that large (as far as our bandwidth allows), and nothing for
   * (0, 0). Until this is called for a track, the SFU forwards the best layer our link
   * carries. Sent only when the size changes; resent after a reconnect.
   * @param {string} trackId  the SFU track id (the `trackId` of the `track` event)
   * @param {number} width
   * @param {number} height
   */
  setVideoSize(trackId, width, height) {
    const message = videoSizeMessage(trackId, width, height);
    const track = this.tracks.get(trackId);
    if (track === undefined || track.participant === this.self?.id) {
      throw new BlindfoldError('unknown_track', `no remote track ${trackId} in this room`);
    }
    if (track.kind !== 'video') throw new BlindfoldError('invalid_argument', `track ${trackId} is not video`);
    const last = this.videoSizes.get(trackId);
    if (last !== undefined && last.width === width && last.height === height) return;
    this.videoSizes.set(trackId, { width, height });
    if (this.videoSizeSupported) this.send(message);
  }

  /**
   * Keep the SFU told how large `element` is drawn, as setVideoSize would, until the returned
   * function is called or the track ends. The size is the element's content box in device
   * pixels (CSS pixels times `pixelDensity`), once it has held still for `debounceMs`; an
   * element not rendered (display: none, removed) counts as (0, 0).
   * @param {string} trackId
   * @param {Element} element  usually the <video> showing the track
   * @param {{debounceMs?: number, pixelDensity?: number}} [options]  pixelDensity defaults to
   *   the screen's devicePixelRatio, so a sharp screen gets a sharp picture
   * @returns {() => void}  stops watching (the last size sent stays in force)
   */
  observeVideoSize(trackId, element, options = {}) {
    this.sizeWatchers.get(trackId)?.();
    if (typeof ResizeObserver !== 'function') return () => {};
    const debounceMs = options.debounceMs ?? VIDEO_SIZE_DEBOUNCE_MS;
    /** @type {ReturnType<typeof setTimeout>|null} */
    let timer = null;
    let stopped = false;
    const measure = () => {
      timer = null;
      if (stopped || !this.tracks.has(trackId)) return;
      const density = options.pixelDensity ?? globalThis.devicePixelRatio ?? 1;
      const box = element.getBoundingClientRect();
      // Client rects include padding and borders; the video is drawn inside them, but a few
      // pixels either way never change the layer.
      let width = Math.round(box.width * density);
      let height = Math.round(box.height * density);
      if (width === 0 || height === 0 || !element.isConnected) width = height = 0;
      width = Math.min(width, MAX_VIDEO_DIMENSION);
      height = Math.min(height, MAX_VIDEO_DIMENSION);
      try {
        this.setVideoSize(trackId, width, height);
      } catch (err) {
        this.clientError('video_size', err);
      }
    };
    const schedule = () => {
      // An observation already queued when stop() ran must not send a size after it.
      if (stopped) return;
      if (timer !== null) clearTimeout(timer);
      timer = setTimeout(measure, debounceMs);
    };
    const observer = new ResizeObserver(schedule);
    observer.observe(element);
    const stop = () => {
      stopped = true;
      observer.disconnect();
      if (timer !== null) clearTimeout(timer);
      timer = null;
      if (this.sizeWatchers.get(trackId) === stop) this.sizeWatchers.delete(trackId);
    };
    this.sizeWatchers.set(trackId, stop);
    return stop;
  }

  /**
   * The size last asked for a received video (setVideoSize or observeVideoSize), or null
   * when none was: the SFU then forwards the best layer our link carries.
   * @param {string} trackId
   * @returns {{width: number, height: number}|null}
   */
  videoSize(trackId) {
    const size = this.videoSizes.get(trackId);
    return size === undefined ? null : { ...size };
  }

  /**
   * What the SFU last reported about a received video (its `video_layer` message), or null
   * before any report: then it forwards the best layer our link carries.
   * @param {string} trackId
   * @returns {VideoLayerState|null}
   */
  videoLayer(trackId) {
    return this.videoLayers.get(trackId) ?? null;
  }

  /**
   * Leave the room: the others are told at once and rotate their keys.
   * @returns {Promise<void>}
   */
  async leave() {
    if (this.state === 'closed') return;
    this.leaving = true;
    const ws = this.ws;
    if (ws !== null && this.send({ type: 'leave' })) {
      // The server closes the socket once it has removed us; wait (briefly) for that so the
      // leave is not lost with a socket closed too early, and the others rotate at once.
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, 1000);
        ws.addEventListener('close', () => { clearTimeout(timer); resolve(undefined); });
      });
    }
    this.shutdown('left');
  }

  /**
   * Close the room socket without leaving, as a network failure would (for tests and
   * diagnostics). Media keeps flowing while the client resumes within the reconnect window.
   */
  dropConnection() {
    // 4000 (an application code): not 1000/1001, which tell the server the client left.
    this.ws?.close(4000, 'simulated connection loss');
  }

  /**
   * Per-peer E2EE state: verified by the key exchange, rejected (and why), and whether its
   * media decrypts.
   * @returns {Record<string, {verified: boolean, rejected: string|null, status: string, counts: Record<string, number>, kids: string[]}>}
   */
  peerStatus() {
    const out = {};
    for (const [id, peer] of this.peerE2ee) {
      out[id] = {
        verified: peer.verified,
        rejected: peer.rejected,
        status: peer.status,
        counts: { ...peer.counts },
        kids: [...peer.kids],
      };
    }
    return out;
  }

  /**
   * Inbound and outbound RTP statistics (from getStats) with the participant each inbound
   * stream belongs to, plus the E2EE worker's frame counters.
   * One outbound entry per simulcast layer (`rid`) of the video.
   * @returns {Promise<{inbound: Record<string, any>[], outbound: Record<string, any>[], e2ee: any, peers: ReturnType<BlindfoldRoom['peerStatus']>}>}
   */
  async getStats() {
    const inbound = [];
    const outbound = [];
    if (this.subscriber !== null) {
      const receivers = new Map(this.subscriber.getReceivers().map((r) => [r.track.id, r]));
      const report = await this.subscriber.getStats();
      report.forEach((s) => {
        if (s.type !== 'inbound-rtp') return;
        const mid = s.mid ?? this.midOfReceiver(receivers.get(s.trackIdentifier));
        const trackId = mid !== undefined ? this.midTracks.get(mid) : undefined;
        const info = trackId !== undefined ? this.tracks.get(trackId) : undefined;
        inbound.push({
          participant: info?.participant ?? null,
          trackId: trackId ?? null,
          kind: s.kind,
          codec: report.get(s.codecId)?.mimeType ?? null,
          packetsReceived: s.packetsReceived ?? 0,
          packetsLost: s.packetsLost ?? 0,
          bytesReceived: s.bytesReceived ?? 0,
          framesReceived: s.framesReceived ?? null,
          framesDecoded: s.framesDecoded ?? null,
          frameWidth: s.frameWidth ?? null,
          frameHeight: s.frameHeight ?? null,
          keyFramesDecoded: s.keyFramesDecoded ?? null,
          pliCount: s.pliCount ?? null,
          audioLevel: s.audioLevel ?? null,
          totalSamplesReceived: s.totalSamplesReceived ?? null,
          concealedSamples: s.concealedSamples ?? null,
        });
      });
    }
    if (this.publisher !== null) {
      const report = await this.publisher.getStats();
      report.forEach((s) => {
        if (s.type !== 'outbound-rtp') return;
        outbound.push({
          kind: s.kind,
          rid: s.rid ?? null,
          codec: report.get(s.codecId)?.mimeType ?? null,
          packetsSent: s.packetsSent ?? 0,
          bytesSent: s.bytesSent ?? 0,
          framesEncoded: s.framesEncoded ?? null,
          frameWidth: s.frameWidth ?? null,
          frameHeight: s.frameHeight ?? null,
          active: s.active ?? null,
          qualityLimitationReason: s.qualityLimitationReason ?? null,
        });
      });
    }
    return { inbound, outbound, e2ee: this.workerStats, peers: this.peerStatus() };
  }

  // --- connection ----------------------------------------------------------------------------

  /**
   * Open a socket and send `join` (or `join` with `resume`); resolves with `joined`. A
   * `redirect` answer (a cluster node sending us to the node the room lives on) is followed
   * with the same join, at most MAX_REDIRECTS times; the room's node then stays our URL.
   * @private
   * @param {boolean} resume
   * @param {number} [hops]
   * @returns {Promise<any>}
   */
  connect(resume, hops = 0) {
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (err) {
        reject(new BlindfoldError('connect_failed', `cannot open ${this.url}: ${err}`));
        return;
      }
      let settled = false;
      const fail = (/** @type {BlindfoldError} */ error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        ws.onclose = null;
        ws.close();
        reject(error);
      };
      const timer = setTimeout(
        () => fail(new BlindfoldError('join_timeout', 'the server did not answer the join in time')),
        REQUEST_TIMEOUT_MS,
      );
      ws.onopen = () => {
        /** @type {Record<string, any>} */
        // reuse_sections: browsers fire a new track event when a retired (inactive) m-section
        // carries a new track, so the SFU may recycle sections instead of appending them.
        const join = { type: 'join', version: PROTOCOL_VERSION, token: this.options.token, reuse_sections: true };
        if (this.options.name) join.name = this.options.name;
        if (resume) join.resume = this.resumeToken;
        ws.send(JSON.stringify(join));
      };
      ws.onerror = () => {}; // onclose follows with the details we have
      ws.onclose = (event) => fail(new BlindfoldError(
        'connect_failed',
        `the connection to ${this.url} closed before joining (code ${event.code})`,
      ));
      ws.onmessage = (event) => {
        let message;
        try {
          message = JSON.parse(event.data);
        } catch {
          fail(new BlindfoldError('invalid_message', 'the server sent something that is not JSON'));
          return;
        }
        if (message.type === 'error') {
          fail(new BlindfoldError(message.code, ERROR_MESSAGES[message.code] ?? message.message, true));
          return;
        }
        if (message.type === 'redirect' && typeof message.url === 'string') {
          if (hops >= MAX_REDIRECTS) {
            fail(new BlindfoldError('too_many_redirects', `still redirected after ${MAX_REDIRECTS} hops`, true));
            return;
          }
          settled = true;
          clearTimeout(timer);
          ws.onclose = null;
          ws.close();
          this.url = message.url;
          this.connect(resume, hops + 1).then(resolve, reject);
          return;
        }
        if (message.type !== 'joined') {
          fail(new BlindfoldError('invalid_message', `expected joined, got ${message.type}`));
          return;
        }
        settled = true;
        clearTimeout(timer);
        this.ws = ws;
        ws.onmessage = (e) => this.receive(e.data);
        ws.onclose = () => this.socketClosed(ws);
        resolve(message);
      };
    });
  }

  /**
   * @private
   * @param {WebSocket} ws
   */
  socketClosed(ws) {
    if (this.ws !== ws) return;
    this.ws = null;
    if (this.leaving || this.state === 'closed') return;
    if (this.rejoining !== null) {
      // The socket of a rejoin attempt: resuming it would race the rejoin, which instead
      // fails this attempt (rather than wait out the publish timeout) and joins afresh.
      this.pendingPublish?.reject(new BlindfoldError('connect_failed', 'the connection closed while rejoining'));
      this.pendingPublish = null;
      return;
    }
    this.reconnect().catch((err) => {
      if (this.rejoinable(err)) {
        this.startRejoin(`the connection was lost and could not be resumed (${err.code}: ${err.message})`);
        return;
      }
      this.emit({ type: 'error', code: err.code ?? 'resume_failed', message: err.message, fatal: true });
      this.shutdown('connection lost');
    });
  }

  /**
   * The socket dropped: media keeps flowing while we resume within the reconnect window.
   * @private
   */
  async reconnect() {
    this.setState('reconnecting');
    const deadline = Date.now() + this.reconnectWindowMs;
    let delay = 250;
    for (;;) {
      if (this.leaving || this.state === 'closed') return;
      try {
        const joined = await this.connect(true);
        this.applyJoined(joined);
        this.setState('connected');
        // Relay messages sent while we were away are lost: announce again so every peer
        // re-sends its current key.
        await this.kx?.resync();
        // Sizes set while the socket was down were not sent; the rest are harmless repeats.
        if (this.videoSizeSupported) {
          for (const [trackId, size] of this.videoSizes) {
            this.send(videoSizeMessage(trackId, size.width, size.height));
          }
        }
        if (this.publisher?.signalingState === 'have-local-offer') {
          // Our offer (or its answer) was lost with the old socket.
          this.send({ type: 'publish_offer', sdp: this.publisher.localDescription?.sdp });
        }
        if (this.rejoinAfterResume !== null) {
          const why = this.rejoinAfterResume;
          this.rejoinAfterResume = null;
          this.startRejoin(why);
        }
        return;
      } catch (err) {
        // A refusal (the window is over, the token expired, ...) ends it; a network error
        // is retried until the window ends.
        if (err instanceof BlindfoldError && err.fatal) throw err;
        // Unreachable while the browser says it is online: the node is most likely gone with
        // our participant, so waiting out the window would only prolong the silence before a
        // rejoin. Offline, the node may be fine and resuming keeps the media running.
        if (this.options.autoRejoin && this.established && globalThis.navigator?.onLine !== false) throw err;
        if (Date.now() + delay > deadline) {
          throw new BlindfoldError('resume_failed', 'could not reconnect to the server in time', true);
        }
        await sleep(delay);
        delay = Math.min(delay * 2, 4000);
      }
    }
  }

  /**
   * A cluster's `joined` lists its other live nodes: a rejoin may go there too, after the
   * URLs the application gave. A page served by a node that dies knows no other otherwise.
   * @private
   * @param {unknown} nodes
   */
  learnNodes(nodes) {
    if (!Array.isArray(nodes)) return;
    for (const url of nodes) {
      if (typeof url !== 'string' || !/^wss?:\/\//.test(url)) continue;
      let normal;
      try { normal = socketUrl(url); } catch { continue; }
      if (!this.entryUrls.includes(normal)) this.entryUrls.push(normal);
    }
  }

  /**
   * Whether a failed resume should end in a rejoin rather than in a closed room.
   * @private
   * @param {unknown} err
   * @returns {boolean}
   */
  rejoinable(err) {
    if (!this.options.autoRejoin || !this.established || this.leaving || this.state === 'closed') return false;
    if (!(err instanceof BlindfoldError)) return false;
    // Not fatal: reconnect() gave up on a node it could not reach. `draining`: that node
    // takes no one back, another will.
    return !err.fatal || err.code === 'resume_failed' || err.code === 'draining';
  }

  /**
   * One of our media connections is gone (the server's `transport_closed`, or our side saw
   * it fail). The SFU never rebuilds a participant's transport, so with autoRejoin only a
   * fresh join brings the media back.
   * @private
   * @param {string} reason
   */
  mediaLost(reason) {
    if (!this.options.autoRejoin || !this.established || this.leaving || this.state === 'closed') return;
    if (this.state === 'reconnecting' && this.rejoining === null) {
      // A resume is under way and would race a rejoin; it keeps the dead transport, so the
      // rejoin follows once it has succeeded (a failed resume rejoins anyway).
      this.rejoinAfterResume = reason;
      return;
    }
    this.startRejoin(reason);
  }

  /**
   * @private
   * @param {string} reason
   */
  startRejoin(reason) {
    if (this.rejoining !== null) return;
    this.rejoinAfterResume = null;
    this.rejoining = this.rejoin(reason)
      .catch((err) => this.rejoinFailed(err))
      .finally(() => { this.rejoining = null; });
  }

  /**
   * Join afresh, as the Python client's auto_rejoin does: the current URL, then the entry
   * URLs in turn, with short delays, until one attempt has joined and published or
   * REJOIN_FOR_MS has passed.
   * @private
   * @param {string} reason
   * @returns {Promise<void>}
   */
  async rejoin(reason) {
    this.setState('reconnecting');
    // Fixed for the whole rejoin: a redirect during an attempt moves this.url, and the
    // rotation must still reach every entry.
    const urls = [...new Set([this.url, ...this.entryUrls])];
    const giveUp = Date.now() + REJOIN_FOR_MS;
    /** @type {unknown} */
    let error = null;
    for (let attempt = 0; attempt === 0 || Date.now() < giveUp; attempt++) {
      await sleep(REJOIN_DELAYS_MS[Math.min(attempt, REJOIN_DELAYS_MS.length - 1)]);
      if (this.leaving || this.state === 'closed') return;
      try {
        await this.rejoinAt(urls[attempt % urls.length]);
      } catch (err) {
        error = err;
        if (this.leaving || this.state === 'closed') return;
        if (err instanceof BlindfoldError && REJOIN_HOPELESS.has(err.code)) break;
        continue;
      }
      if (this.leaving || this.state === 'closed') return;
      this.setState('connected');
      this.emit({ type: 'rejoined', reason, node: this.url });
      return;
    }
    this.rejoinFailed(error);
  }

  /**
   * @private
   * @param {unknown} error  the last attempt's failure
   */
  rejoinFailed(error) {
    if (this.state === 'closed') return;
    this.dropSession();
    const code = error instanceof BlindfoldError ? error.code : null;
    const cause = error instanceof Error ? error.message : String(error);
    this.emit({ type: 'error', code: 'rejoin_failed', message: `could not rejoin the room: ${cause}`, fatal: true, cause: code });
    this.leaving = true;
    this.shutdown('rejoin failed');
  }

  /**
   * One rejoin attempt through `url`: a fresh join (not a resume: our old participant is
   * gone, or about to be replaced by this one), a new key exchange for the new participant
   * id and slot, and `media` published again on a new connection.
   * @private
   * @param {string} url
   */
  async rejoinAt(url) {
    this.dropSession();
    this.url = url;
    const joined = await this.connect(false);
    if (this.leaving || this.state === 'closed') {
      // leave() (or a fatal error) came while this join was on its way: it must not linger.
      this.dropSession();
      return;
    }
    const ws = this.ws;
    this.applyJoined(joined);
    this.startKeyExchange();
    await this.kx?.start();
    if (this.ws !== ws) throw new BlindfoldError('connect_failed', 'the connection closed while rejoining');
    const media = this.options.media;
    // The same MediaStreamTracks: a track may be sent on a new RTCPeerConnection once the old
    // one is closed, and publish() attaches a fresh encrypt transform to each new sender.
    if (media && media.getTracks().length > 0) await this.publish(media);
  }

  /**
   * Let go of the current participant: its socket (closed with 1000, so the server removes
   * it now and the others rotate their keys at once), both peer connections, its key
   * exchange and all media state. Participants are kept; the next `joined` says who is left.
   * @private
   */
  dropSession() {
    const ws = this.ws;
    this.ws = null;
    if (ws !== null) {
      ws.onmessage = null;
      ws.onclose = null;
      ws.close(1000);
    }
    if (this.pendingPublish !== null) {
      this.pendingPublish.reject(new BlindfoldError('connect_failed', 'the connection was replaced by a rejoin'));
      this.pendingPublish = null;
    }
    // Remote media ends with the old receiving connection: the app hears so now, and gets
    // new `track` events from the new one. Our own tracks get new ids from the next join.
    for (const track of [...this.tracks.values()]) {
      if (track.participant === this.self?.id) this.tracks.delete(track.id);
      else this.trackUnpublished(track.id);
    }
    this.ownTracks = {};
    this.streams.clear();
    this.midTracks.clear();
    this.publisher?.close();
    this.publisher = null;
    this.subscriber?.close();
    this.subscriber = null;
    this.subscriberQueue = Promise.resolve();
    // Its timers may still fire: startKeyExchange's callbacks ignore a replaced exchange.
    this.kx = null;
    for (const peer of this.peerE2ee.values()) {
      // Every peer has to verify our new participant id before it sends us its key again.
      peer.verified = false;
      peer.rejected = null;
      peer.status = 'waiting';
      peer.failing = 0;
    }
  }

  /**
   * Take a `joined` message (first or resumed): our identity, and a fresh snapshot of the
   * room that replaces what we knew.
   * @private
   * @param {any} joined
   */
  applyJoined(joined) {
    this.self = joined.participant;
    this.resumeToken = joined.resume_token;
    this.iceServers = Array.isArray(joined.ice_servers) ? joined.ice_servers : [];
    this.learnNodes(joined.nodes);
    const before = new Map(this.participants);
    const now = new Map((joined.participants ?? []).map((p) => [p.id, p]));
    for (const id of before.keys()) if (!now.has(id)) this.participantLeft(id);
    const trackIds = new Set((joined.tracks ?? []).map((t) => t.id));
    for (const id of [...this.tracks.keys()]) {
      const track = this.tracks.get(id);
      if (!trackIds.has(id) && track?.participant !== this.self?.id) this.trackUnpublished(id);
    }
    for (const [id, participant] of now) {
      if (!before.has(id)) this.participantJoined(participant, false);
      else this.participants.set(id, participant);
    }
    for (const track of joined.tracks ?? []) if (!this.tracks.has(track.id)) this.trackPublished(track);
    this.emit({
      type: 'joined',
      resumed: joined.resumed === true,
      participant: this.self,
      participants: [...this.participants.values()],
      tracks: [...this.tracks.values()],
      e2eePolicy: joined.e2ee_policy,
    });
    // Whoever is speaking already: a joiner (or a resumed client) shows it at once, not at
    // the next change.
    this.speakers = Array.isArray(joined.speakers) ? joined.speakers.filter((s) => typeof s === 'string') : [];
    this.emit({ type: 'active_speaker', speakers: this.speakers });
  }

  /**
   * @private
   * @param {Record<string, any>} message
   * @returns {boolean} whether it was sent
   */
  send(message) {
    if (this.ws === null || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  /**
   * @private
   * @param {string} text
   */
  receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      this.emit({ type: 'error', code: 'invalid_message', message: 'the server sent invalid JSON', fatal: false });
      return;
    }
    switch (message.type) {
      case 'relay':
        this.kx?.onRelay(message.from, message.payload).catch((err) => this.clientError('key_exchange', err));
        break;
      case 'subscribe_offer':
        this.subscriberQueue = this.subscriberQueue
          .then(() => this.answerSubscriber(message.sdp))
          .catch((err) => this.clientError('subscribe_failed', err));
        break;
      case 'publish_answer':
        this.pendingPublish?.resolve(message);
        this.pendingPublish = null;
        break;
      case 'participant_joined':
        this.participantJoined(message.participant, true);
        break;
      case 'participant_left':
        this.participantLeft(message.participant);
        break;
      case 'track_published':
        this.trackPublished(message.track);
        break;
      case 'track_unpublished':
        this.trackUnpublished(message.track);
        break;
      case 'track_muted': {
        const track = this.tracks.get(message.track);
        if (track !== undefined) track.muted = message.muted === true;
        this.emit({ type: 'track_muted', participant: message.participant, trackId: message.track, muted: message.muted === true, kind: track?.kind });
        break;
      }
      case 'active_speaker':
        this.speakers = Array.isArray(message.speakers) ? message.speakers : [];
        this.emit({ type: 'active_speaker', speakers: this.speakers });
        break;
      case 'video_layer': {
        const state = parseVideoLayer(message);
        if (state === null) break;
        const track = this.tracks.get(state.trackId);
        // A report racing the track's end would resurrect state nobody clears.
        if (track === undefined) break;
        this.videoLayers.set(state.trackId, state);
        this.emit({ type: 'video_layer', participant: track.participant, ...state });
        break;
      }
      case 'subscription_failed':
        this.emit({ type: 'error', code: message.code, message: ERROR_MESSAGES[message.code] ?? message.message, fatal: false, track: message.track });
        break;
      case 'error':
        if (message.code === 'unknown_type' && /video_size/.test(String(message.message))) {
          // An SFU without per-subscriber layers: it forwards what it has, which is what
          // no size cap means. Nothing for the app to act on, so no error event.
          this.videoSizeSupported = false;
          break;
        }
        if (this.pendingPublish !== null && PUBLISH_ERRORS.has(message.code)) {
          this.pendingPublish.reject(new BlindfoldError(message.code, message.message));
          this.pendingPublish = null;
        }
        this.emit({ type: 'error', code: message.code, message: ERROR_MESSAGES[message.code] ?? message.message, detail: message.message, fatal: message.fatal === true });
        if (message.fatal === true) {
          this.leaving = true;
          this.shutdown(message.code);
        } else if (message.code === 'transport_closed') {
          this.mediaLost(String(message.message ?? 'a media connection closed'));
        }
        break;
      case 'pong':
        break;
      default:
        // A newer server may add messages; ignore what we do not know.
        break;
    }
  }

  // --- membership ----------------------------------------------------------------------------

  /**
   * @private
   * @param {Participant} participant
   * @param {boolean} live  false while applying a snapshot
   */
  participantJoined(participant, live) {
    if (participant.id === this.self?.id) return;
    this.participants.set(participant.id, participant);
    if (participant.kind === 'rtc') {
      this.peerState(participant.id);
      this.kx?.peerJoined(participant.id).catch((err) => this.clientError('key_exchange', err));
    }
    if (live) this.emit({ type: 'participant_joined', participant });
  }

  /**
   * @private
   * @param {string} id
   */
  participantLeft(id) {
    const participant = this.participants.get(id);
    this.participants.delete(id);
    for (const track of [...this.tracks.values()]) {
      if (track.participant === id) this.trackUnpublished(track.id);
    }
    this.streams.delete(id);
    this.peerE2ee.delete(id);
    // The key exchange forgets the peer and, if it held our key, rotates ours.
    this.kx?.peerLeft(id).catch((err) => this.clientError('key_exchange', err));
    this.speakers = this.speakers.filter((s) => s !== id);
    this.emit({ type: 'participant_left', participant: id, name: participant?.name ?? null });
  }

  /**
   * @private
   * @param {TrackInfo} track
   */
  trackPublished(track) {
    this.tracks.set(track.id, track);
    if (track.participant === this.self?.id) {
      this.ownTracks[track.kind] = track.id;
      // A mute set before the server knew the track.
      if (this.muted[track.kind]) this.send({ type: 'mute', track: track.id, muted: true });
    }
  }

  /**
   * @private
   * @param {string} trackId
   */
  trackUnpublished(trackId) {
    const track = this.tracks.get(trackId);
    this.tracks.delete(trackId);
    this.sizeWatchers.get(trackId)?.();
    this.videoSizes.delete(trackId);
    this.videoLayers.delete(trackId);
    if (track === undefined || track.participant === this.self?.id) return;
    const stream = this.streams.get(track.participant);
    const receiver = this.receiverOf(trackId);
    if (stream !== undefined && receiver !== undefined) stream.removeTrack(receiver.track);
    this.emit({ type: 'track_removed', participant: track.participant, kind: track.kind, trackId });
  }

  // --- E2EE ------------------------------------------------------------------------------------

  /** @private */
  startWorker() {
    const url = this.options.workerUrl ?? new URL('../e2ee/worker.js', import.meta.url);
    const worker = new Worker(url, { type: 'module' });
    worker.onmessage = (event) => {
      if (event.data?.type === 'stats') this.takeWorkerStats(event.data);
      else if (event.data?.type === 'error') this.emit({ type: 'error', code: 'e2ee_worker', message: event.data.message, fatal: false });
    };
    worker.onerror = (event) => {
      this.emit({ type: 'error', code: 'e2ee_worker', message: `the E2EE worker failed: ${event.message}`, fatal: false });
    };
    this.worker = worker;
  }

  /** @private */
  startKeyExchange() {
    const self = this.self;
    if (self === null || typeof self.slot !== 'number') {
      throw new BlindfoldError('no_slot', 'the server gave this participant no E2EE sender slot');
    }
    /** @type {KeyExchange|null} */
    let kx = null;
    // After a rejoin the old exchange's timers still fire (a delayed key switch, a rotation):
    // its keys belong to a participant that is gone and must reach neither the worker nor
    // the new socket.
    const live = () => kx !== null && this.kx === kx;
    /** @type {import('../e2ee/keyexchange.js').KeyExchangeOptions} */
    const kxOptions = {
      slot: self.slot,
      onSendKey: (kid, key) => {
        if (!live()) return;
        this.worker?.postMessage({ type: 'setSendKey', kid, key });
        // The exchange sets its current key before calling us.
        const current = this.kx?.currentSendKey();
        const generation = current?.kid === kid ? current.generation : Number(kid & 0xfn);
        const entry = { kid: kidHex(kid), generation, at: Date.now() };
        this.sendKeys.push(entry);
        if (this.options.recordKeys) this.keyLog.push({ direction: 'send', participant: self.id, kid: entry.kid, key: hex(key) });
        this.emit({ type: 'send_key', kid: entry.kid, generation: entry.generation });
      },
      onKeyRemoved: (_sender, kid) => {
        if (live()) this.worker?.postMessage({ type: 'removeReceiveKey', kid });
      },
      onPeerVerified: (peerId) => {
        if (!live()) return;
        const peer = this.peerState(peerId);
        peer.verified = true;
        peer.rejected = null;
        this.emit({ type: 'peer_verified', participant: peerId });
      },
    };
    if (this.options.kxIterations !== undefined) kxOptions.iterations = this.options.kxIterations;
    kx = new KeyExchange(
      this.roomName,
      self.id,
      this.options.passphrase,
      (to, payload) => {
        if (!live()) return;
        /** @type {Record<string, any>} */
        const message = { type: 'relay', payload };
        if (to !== null) message.to = to;
        // Lost while the socket is down; resync() after resuming makes up for it.
        this.send(message);
      },
      (sender, kid, key) => {
        if (!live()) return;
        this.worker?.postMessage({ type: 'addReceiveKey', kid, key });
        const peer = this.peerState(sender);
        peer.kids.add(kidHex(kid));
        if (this.options.recordKeys) this.keyLog.push({ direction: 'receive', participant: sender, kid: kidHex(kid), key: hex(key) });
        this.emit({ type: 'receive_key', participant: sender, kid: kidHex(kid) });
      },
      (peerId, reason) => {
        if (!live()) return;
        const peer = this.peerState(peerId);
        if (peer.rejected === reason) return;
        peer.rejected = reason;
        this.emit({ type: 'peer_rejected', participant: peerId, reason });
      },
      kxOptions,
    );
    this.kx = kx;
    for (const participant of this.participants.values()) {
      if (participant.kind === 'rtc') kx.peerJoined(participant.id).catch((err) => this.clientError('key_exchange', err));
    }
  }

  /**
   * @private
   * @param {string} id
   * @returns {PeerE2ee}
   */
  peerState(id) {
    let peer = this.peerE2ee.get(id);
    if (peer === undefined) {
      peer = {
        verified: false, rejected: null, status: 'waiting', failing: 0,
        counts: { ok: 0, authFailed: 0, unknownKid: 0, malformed: 0 }, kids: new Set(),
      };
      this.peerE2ee.set(id, peer);
    }
    return peer;
  }

  /**
   * Fold the worker's per-stream counters into per-peer decrypt status.
   * @private
   * @param {any} stats
   */
  takeWorkerStats(stats) {
    this.workerStats = stats;
    /** @type {Map<string, {ok: number, authFailed: number, unknownKid: number, malformed: number}>} */
    const sums = new Map();
    for (const stream of stats.streams ?? []) {
      if (stream.operation !== 'decrypt' || !stream.peerId) continue;
      const sum = sums.get(stream.peerId) ?? { ok: 0, authFailed: 0, unknownKid: 0, malformed: 0 };
      sum.ok += stream.ok;
      sum.authFailed += stream.authFailed;
      sum.unknownKid += stream.unknownKid;
      sum.malformed += stream.malformed;
      sums.set(stream.peerId, sum);
    }
    for (const [id, sum] of sums) {
      if (!this.participants.has(id)) continue;
      const peer = this.peerState(id);
      const okDelta = Math.max(0, sum.ok - peer.counts.ok);
      const failDelta = Math.max(0, sum.authFailed + sum.unknownKid + sum.malformed
        - (peer.counts.authFailed + peer.counts.unknownKid + peer.counts.malformed));
      peer.counts = sum;
      let status = peer.status;
      if (okDelta > 0) {
        peer.failing = 0;
        status = 'ok';
      } else if (failDelta > 0) {
        peer.failing += 1;
        if (peer.failing >= CANNOT_DECRYPT_AFTER) status = 'cannot-decrypt';
      }
      if (status !== peer.status) {
        peer.status = status;
        this.emit({ type: 'decrypt_status', participant: id, status, counts: { ...sum } });
      }
    }
  }

  /**
   * @private
   * @param {RTCRtpSender|RTCRtpReceiver} endpoint
   * @param {Record<string, any>} options  worker transform options
   */
  attachTransform(endpoint, options) {
    if (this.worker === null) throw new BlindfoldError('no_worker', 'the E2EE worker is not running');
    if (this.transformApi === 'script') {
      endpoint.transform = new RTCRtpScriptTransform(this.worker, options);
      return;
    }
    const { readable, writable } = /** @type {any} */ (endpoint).createEncodedStreams();
    this.worker.postMessage({ type: 'stream', readable, writable, options }, [readable, writable]);
  }

  // --- media -----------------------------------------------------------------------------------

  /** @private @returns {RTCConfiguration} */
  peerConfig() {
    /** @type {Record<string, any>} */
    const config = { iceServers: this.iceServers, bundlePolicy: 'max-bundle', rtcpMuxPolicy: 'require' };
    if (this.transformApi === 'streams') config.encodedInsertableStreams = true;
    return config;
  }

  /**
   * Publish the local tracks on the publisher connection: every frame encrypted, video in VP8
   * and audio in Opus (the codecs whose clear prefix docs/e2ee.md defines).
   * @private
   * @param {MediaStream} stream
   */
  async publish(stream) {
    const pc = new RTCPeerConnection(this.peerConfig());
    this.publisher = pc;
    pc.onconnectionstatechange = () => {
      // A connection a rejoin replaced is no news.
      if (pc.connectionState === 'failed' && pc === this.publisher) {
        this.emit({ type: 'error', code: 'transport_closed', message: 'The connection for your camera and microphone failed.', fatal: false });
        this.mediaLost('the connection for your camera and microphone failed');
      }
    };
    /** @type {{transceiver: RTCRtpTransceiver, layers: RTCRtpEncodingParameters[]}[]} */
    const layered = [];
    for (const track of stream.getTracks()) {
      const kind = /** @type {'audio'|'video'} */ (track.kind);
      const encodings = sendEncodings(kind, this.options.simulcast ?? true, track.getSettings?.() ?? {});
      /** @type {RTCRtpTransceiverInit} */
      const init = { direction: 'sendonly', streams: [stream] };
      if (encodings !== undefined) init.sendEncodings = encodings;
      let transceiver;
      try {
        transceiver = pc.addTransceiver(track, init);
      } catch (err) {
        // A browser without simulcast still makes a good call with one encoding.
        if (encodings === undefined) throw err;
        console.warn('blindfold: this browser refused simulcast layers; publishing one encoding', err);
        transceiver = pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
      }
      if (encodings !== undefined && encodings.length > 1) layered.push({ transceiver, layers: encodings });
      preferCodec(transceiver, kind);
      // One transform per sender sees the frames of all its layers, and every frame takes the
      // next value of the one shared SFrame counter: nothing here is per SSRC.
      this.attachTransform(transceiver.sender, { operation: 'encrypt', kind });
      track.enabled = !this.muted[kind];
    }
    await pc.setLocalDescription(await pc.createOffer());
    const answer = await this.request(pc.localDescription?.sdp ?? '');
    await pc.setRemoteDescription({ type: 'answer', sdp: answer.sdp });
    for (const { transceiver, layers } of layered) {
      if (transceiver.mid === null || simulcastAccepted(answer.sdp, transceiver.mid)) continue;
      await this.singleEncoding(transceiver.sender, layers).catch((err) => this.clientError('simulcast', err));
    }
  }

  /**
   * The SFU refused simulcast, so the browser sends only the first (lowest) layer: lift
   * that encoding to the top layer's size and bitrate, or everyone would get a thumbnail.
   * @private
   * @param {RTCRtpSender} sender
   * @param {RTCRtpEncodingParameters[]} layers  what was asked for, lowest first
   */
  async singleEncoding(sender, layers) {
    const parameters = sender.getParameters();
    const [first] = parameters.encodings;
    if (first === undefined) return;
    const top = layers[layers.length - 1];
    first.scaleResolutionDownBy = top.scaleResolutionDownBy ?? 1;
    if (top.maxBitrate !== undefined) first.maxBitrate = top.maxBitrate;
    else delete first.maxBitrate;
    first.active = true;
    await sender.setParameters(parameters);
  }

  /**
   * Send a publish_offer and wait for its answer.
   * @private
   * @param {string} sdp
   * @returns {Promise<any>}
   */
  request(sdp) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pendingPublish = null;
        reject(new BlindfoldError('timeout', 'the server did not answer the publish offer'));
      }, REQUEST_TIMEOUT_MS);
      this.pendingPublish = {
        resolve: (m) => { clearTimeout(timer); resolve(m); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      };
      // If the socket is down, reconnect() sends the offer again once it has resumed.
      this.send({ type: 'publish_offer', sdp });
    });
  }

  /**
   * Answer the SFU's (re)offer for the subscriber connection.
   * @private
   * @param {string} sdp
   */
  async answerSubscriber(sdp) {
    if (this.state === 'closed') return;
    if (this.subscriber === null) {
      const pc = new RTCPeerConnection(this.peerConfig());
      pc.ontrack = (event) => this.remoteTrack(event);
      pc.onconnectionstatechange = () => {
        if (pc.connectionState === 'failed' && pc === this.subscriber) {
          this.emit({ type: 'error', code: 'transport_closed', message: 'The connection for receiving media failed.', fatal: false });
          this.mediaLost('the connection for receiving media failed');
        }
      };
      this.subscriber = pc;
    }
    for (const [mid, trackId] of tracksByMid(sdp)) this.midTracks.set(mid, trackId);
    const pc = this.subscriber;
    await pc.setRemoteDescription({ type: 'offer', sdp });
    // An offer for a connection a rejoin replaced meanwhile: answering it on the new socket
    // would be read as the answer to the new connection's offer.
    if (pc !== this.subscriber) return;
    // ontrack attached transforms to new receivers; cover any it missed.
    for (const transceiver of pc.getTransceivers()) {
      if (transceiver.currentDirection !== 'stopped' && transceiver.mid !== null) this.ensureDecrypt(transceiver);
    }
    const answer = await pc.createAnswer();
    // The SFU is the DTLS server on every transport (docs/protocol.md): answer active.
    const fixed = answer.sdp?.replace(/^a=setup:(passive|actpass)\r?$/gm, 'a=setup:active');
    await pc.setLocalDescription({ type: 'answer', sdp: fixed });
    if (pc !== this.subscriber) return;
    this.send({ type: 'subscribe_answer', sdp: pc.localDescription?.sdp });
  }

  /**
   * @private
   * @param {RTCRtpTransceiver} transceiver
   */
  ensureDecrypt(transceiver) {
    const receiver = transceiver.receiver;
    const trackId = transceiver.mid !== null ? this.midTracks.get(transceiver.mid) : undefined;
    const info = trackId !== undefined ? this.tracks.get(trackId) : undefined;
    const peerId = info?.participant ?? null;
    const known = this.transformed.get(receiver);
    if (known !== undefined) {
      // The SFU recycles retired sections: the same receiver now carries another sender's
      // track, so its decrypt stats must be labelled (and judged) as that sender's.
      if (trackId !== undefined && known.trackId !== trackId) {
        known.trackId = trackId;
        this.worker?.postMessage({ type: 'relabel', label: known.label, peerId, trackId });
      }
      return;
    }
    const label = this.nextLabel++;
    this.transformed.set(receiver, { label, trackId: trackId ?? null });
    this.attachTransform(receiver, {
      operation: 'decrypt',
      kind: receiver.track.kind,
      peerId,
      trackId: trackId ?? null,
      label,
    });
  }

  /**
   * @private
   * @param {RTCTrackEvent} event
   */
  remoteTrack(event) {
    this.ensureDecrypt(event.transceiver);
    const mid = event.transceiver.mid;
    const trackId = mid !== null ? this.midTracks.get(mid) : undefined;
    const info = trackId !== undefined ? this.tracks.get(trackId) : undefined;
    if (info === undefined || trackId === undefined) return;
    let stream = this.streams.get(info.participant);
    if (stream === undefined) {
      stream = new MediaStream();
      this.streams.set(info.participant, stream);
    }
    stream.addTrack(event.track);
    this.emit({ type: 'track', participant: info.participant, kind: info.kind, trackId, track: event.track, stream });
  }

  /**
   * @private
   * @param {string} trackId
   * @returns {RTCRtpReceiver|undefined}
   */
  receiverOf(trackId) {
    if (this.subscriber === null) return undefined;
    for (const t of this.subscriber.getTransceivers()) {
      if (t.mid !== null && this.midTracks.get(t.mid) === trackId) return t.receiver;
    }
    return undefined;
  }

  /**
   * @private
   * @param {RTCRtpReceiver|undefined} receiver
   * @returns {string|undefined}
   */
  midOfReceiver(receiver) {
    if (receiver === undefined || this.subscriber === null) return undefined;
    return this.subscriber.getTransceivers().find((t) => t.receiver === receiver)?.mid ?? undefined;
  }

  // --- plumbing --------------------------------------------------------------------------------

  /**
   * @private
   * @param {string} state
   */
  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit({ type: 'connection', state });
  }

  /**
   * @private
   * @param {string} reason
   */
  shutdown(reason) {
    if (this.state === 'closed') return;
    this.setState('closed');
    if (this.pendingPublish !== null) {
      this.pendingPublish.reject(new BlindfoldError('closed', 'left the room'));
      this.pendingPublish = null;
    }
    const ws = this.ws;
    this.ws = null;
    ws?.close();
    this.publisher?.close();
    this.subscriber?.close();
    this.worker?.terminate();
    this.worker = null;
    this.emit({ type: 'left', reason });
  }

  /**
   * @private
   * @param {string} code
   * @param {unknown} err
   */
  clientError(code, err) {
    const message = err instanceof Error ? err.message : String(err);
    this.emit({ type: 'error', code, message, fatal: false });
  }

  /**
   * @private
   * @param {RoomEvent} event
   */
  emit(event) {
    try {
      this.onEvent(event);
    } catch (err) {
      console.error('blindfold: onEvent handler failed', err);
    }
  }
}

/**
 * @typedef {Object} PeerE2ee
 * @property {boolean} verified  proved the passphrase (key exchange)
 * @property {string|null} rejected  why the key exchange refused it, if it did
 * @property {'waiting'|'ok'|'cannot-decrypt'} status  whether its frames decrypt
 * @property {number} failing  consecutive stats intervals with failures and no good frame
 * @property {{ok: number, authFailed: number, unknownKid: number, malformed: number}} counts
 * @property {Set<string>} kids  KIDs received from it
 */

/**
 * @param {'auto'|'script'|'streams'} wanted
 * @returns {'script'|'streams'}
 */
function pickTransformApi(wanted) {
  const hasScript = typeof globalThis.RTCRtpScriptTransform === 'function';
  const hasStreams = typeof globalThis.RTCRtpSender !== 'undefined'
    && typeof RTCRtpSender.prototype.createEncodedStreams === 'function';
  if (wanted === 'script' && hasScript) return 'script';
  if (wanted === 'streams' && hasStreams) return 'streams';
  if (wanted === 'auto') {
    if (hasScript) return 'script';
    if (hasStreams) return 'streams';
  }
  throw new BlindfoldError(
    'e2ee_unsupported',
    'This browser cannot encrypt media frames (no RTCRtpScriptTransform or encoded streams): '
      + 'Blindfold calls are always end-to-end encrypted. Use a recent Chrome, Edge, Firefox or Safari.',
    true,
  );
}

/**
 * Keep only the codecs the E2EE frame format defines: VP8 (with RTX) for video, Opus for audio.
 * @param {RTCRtpTransceiver} transceiver
 * @param {'audio'|'video'} kind
 */
function preferCodec(transceiver, kind) {
  if (typeof transceiver.setCodecPreferences !== 'function' || typeof RTCRtpSender.getCapabilities !== 'function') return;
  const codecs = RTCRtpSender.getCapabilities(kind)?.codecs ?? [];
  const wanted = kind === 'video' ? ['video/vp8', 'video/rtx'] : ['audio/opus'];
  const chosen = codecs.filter((c) => wanted.includes(c.mimeType.toLowerCase()));
  if (!chosen.some((c) => c.mimeType.toLowerCase() !== 'video/rtx')) {
    throw new BlindfoldError('codec_not_supported', `this browser cannot send ${kind === 'video' ? 'VP8' : 'Opus'}`);
  }
  transceiver.setCodecPreferences(chosen);
}
