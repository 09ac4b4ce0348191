// The browser client's logic (sfu/web/client/blindfold.js) that needs no browser: the
// simulcast encodings it publishes, the video_size message, the video_layer event, following
// a cluster's redirect and rejoining after the media or the node is gone, and what a
// BlindfoldRoom sends and emits for them, driven through stand-ins for the socket, the peer
// connections and the E2EE worker.
import assert from 'node:assert/strict';
import { mock, test } from 'node:test';

import {
  BlindfoldError,
  BlindfoldRoom,
  SIMULCAST_LAYERS,
  parseVideoLayer,
  sendEncodings,
  simulcastAccepted,
  simulcastLayerLimit,
  videoSizeMessage,
} from '../../sfu/web/client/blindfold.js';

test('video is published as three layers, lowest first, each with its own rid', () => {
  const encodings = sendEncodings('video');
  assert.deepEqual(encodings.map((e) => e.rid), ['q', 'h', 'f']);
  assert.deepEqual(encodings.map((e) => e.scaleResolutionDownBy), [4, 2, 1]);
  const bitrates = encodings.map((e) => e.maxBitrate);
  assert.deepEqual([...bitrates].sort((a, b) => a - b), bitrates, 'bitrates rise with the layer');
  // Copies, so a browser that writes to them cannot change the defaults.
  assert.notEqual(encodings[0], SIMULCAST_LAYERS[0]);
  encodings[0].maxBitrate = 1;
  assert.equal(SIMULCAST_LAYERS[0].maxBitrate, 150_000);
});

test('audio, and video with simulcast off, keep the single default encoding', () => {
  assert.equal(sendEncodings('audio'), undefined);
  assert.equal(sendEncodings('audio', true, { width: 1280, height: 720 }), undefined);
  assert.equal(sendEncodings('video', false), undefined);
  assert.equal(sendEncodings('video', false, { width: 1280, height: 720 }), undefined);
});

test('a small camera leaves out the lowest layers, never the full one', () => {
  // Chromium 156 encodes 3 layers from 960x540 pixels, 2 from 480x270, 1 below, and drops
  // the top ones beyond that.
  assert.equal(simulcastLayerLimit(1280, 720), 3);
  assert.equal(simulcastLayerLimit(960, 540), 3);
  assert.equal(simulcastLayerLimit(640, 480), 2);
  assert.equal(simulcastLayerLimit(480, 640), 2);
  assert.equal(simulcastLayerLimit(480, 270), 2);
  assert.equal(simulcastLayerLimit(320, 240), 1);
  const rids = (/** @type {any} */ size) => sendEncodings('video', true, size)?.map((e) => e.rid);
  assert.deepEqual(rids({ width: 1920, height: 1080 }), ['q', 'h', 'f']);
  assert.deepEqual(rids({ width: 640, height: 480 }), ['h', 'f']);
  assert.equal(rids({ width: 320, height: 240 }), undefined);
  // Unknown size: all layers, the browser decides.
  assert.deepEqual(rids({}), ['q', 'h', 'f']);
  assert.deepEqual(rids(undefined), ['q', 'h', 'f']);
});

test('custom layers are used as given, and bad ones refused', () => {
  const two = [{ rid: 'lo', scaleResolutionDownBy: 2, maxBitrate: 200_000 }, { rid: 'hi' }];
  assert.deepEqual(sendEncodings('video', two), two);
  assert.notEqual(sendEncodings('video', two)[0], two[0]);
  for (const bad of [[], [{ rid: 'a' }, { rid: 'a' }], [{}], [{ rid: 'no spaces' }], [{ rid: '' }], 'yes']) {
    assert.throws(() => sendEncodings('video', /** @type {any} */ (bad)), BlindfoldError, JSON.stringify(bad));
  }
});

test('simulcast counts as accepted only with a=simulcast:recv in that section', () => {
  const answer = [
    'v=0', 'o=- 1 1 IN IP4 0.0.0.0', 's=-', 't=0 0', 'a=group:BUNDLE 0 1',
    'm=audio 9 UDP/TLS/RTP/SAVPF 111', 'a=mid:0', 'a=recvonly',
    'm=video 9 UDP/TLS/RTP/SAVPF 96', 'a=mid:1', 'a=recvonly', 'a=rid:h recv', 'a=rid:f recv',
    'a=simulcast:recv h;f', '',
  ].join('\r\n');
  assert.equal(simulcastAccepted(answer, '1'), true);
  assert.equal(simulcastAccepted(answer, '0'), false);
  assert.equal(simulcastAccepted(answer, '7'), false);
  assert.equal(simulcastAccepted(answer.replace('a=simulcast:recv h;f\r\n', ''), '1'), false);
});

test('video_size carries the track and the size; 0 x 0 is no video', () => {
  assert.deepEqual(videoSizeMessage('TR_v', 16384, 16384).width, 16384);
  assert.deepEqual(videoSizeMessage('TR_v', 320, 180), { type: 'video_size', track: 'TR_v', width: 320, height: 180 });
  assert.deepEqual(JSON.parse(JSON.stringify(videoSizeMessage('TR_v', 0, 0))),
    { type: 'video_size', track: 'TR_v', width: 0, height: 0 });
  for (const [track, w, h] of [['', 1, 1], ['t', -1, 10], ['t', 1.5, 10], ['t', 10, NaN], ['t', 0, 10],
    ['t', 10, 0], ['t', 16385, 10], [undefined, 1, 1], ['t', '320', 240]]) {
    assert.throws(() => videoSizeMessage(/** @type {any} */ (track), /** @type {any} */ (w), /** @type {any} */ (h)),
      BlindfoldError, `${track} ${w} ${h}`);
  }
});

test('video_layer messages are read as the protocol gives them', () => {
  assert.deepEqual(
    parseVideoLayer({ type: 'video_layer', track: 'T', paused: false, reason: null, layer: { rid: 'q', width: 160, height: 120 }, bandwidth_estimate: 450000 }),
    { trackId: 'T', paused: false, reason: null, layer: { rid: 'q', width: 160, height: 120 }, bandwidthEstimate: 450000 },
  );
  assert.deepEqual(
    parseVideoLayer({ type: 'video_layer', track: 'T', paused: true, reason: 'bandwidth', layer: null, bandwidth_estimate: null }),
    { trackId: 'T', paused: true, reason: 'bandwidth', layer: null, bandwidthEstimate: null },
  );
  assert.equal(parseVideoLayer({ track: 'T', paused: false, reason: 'publisher', layer: null }).reason, 'publisher');
  // A reason from a newer server is not guessed at.
  assert.equal(parseVideoLayer({ track: 'T', paused: true, reason: 'other', layer: null }).reason, null);
  assert.equal(parseVideoLayer({ track: 'T', paused: 'yes', layer: null }), null);
  assert.equal(parseVideoLayer({ paused: true, layer: null }), null);
  assert.equal(parseVideoLayer({ track: 'T', paused: false, layer: { width: 1 } }), null);
});

// --- a room with the socket replaced ---------------------------------------------------------------

/** A token whose payload names the room (the client reads it without verifying). */
const TOKEN = `e30.${Buffer.from(JSON.stringify({ room: 'r' })).toString('base64url')}.sig`;

function fakeRoom() {
  globalThis.RTCRtpScriptTransform ??= /** @type {any} */ (function RTCRtpScriptTransform() {});
  globalThis.WebSocket ??= /** @type {any} */ ({ OPEN: 1 });
  /** @type {any[]} */
  const events = [];
  /** @type {any[]} */
  const sent = [];
  const room = /** @type {any} */ (new BlindfoldRoom({ token: TOKEN, passphrase: 'p', url: 'http://127.0.0.1:7880', onEvent: (e) => events.push(e) }));
  room.ws = { readyState: 1, send: (/** @type {string} */ text) => sent.push(JSON.parse(text)) };
  room.self = { id: 'me', identity: 'me', name: null, kind: 'rtc', slot: 1 };
  room.state = 'connected';
  for (const track of [
    { id: 'TR_v', participant: 'ada', kind: 'video', codec: 'VP8', stream: 's', muted: false },
    { id: 'TR_a', participant: 'ada', kind: 'audio', codec: 'opus', stream: 's', muted: false },
    { id: 'TR_mine', participant: 'me', kind: 'video', codec: 'VP8', stream: 'm', muted: false },
  ]) room.trackPublished(track);
  return { room, events, sent };
}

test('setVideoSize sends video_size once per change, for remote video only', () => {
  const { room, sent } = fakeRoom();
  room.setVideoSize('TR_v', 320, 240);
  room.setVideoSize('TR_v', 320, 240);
  room.setVideoSize('TR_v', 0, 0);
  assert.deepEqual(sent, [
    { type: 'video_size', track: 'TR_v', width: 320, height: 240 },
    { type: 'video_size', track: 'TR_v', width: 0, height: 0 },
  ]);
  assert.throws(() => room.setVideoSize('TR_a', 320, 240), { code: 'invalid_argument' });
  assert.throws(() => room.setVideoSize('TR_mine', 320, 240), { code: 'unknown_track' });
  assert.throws(() => room.setVideoSize('TR_nope', 320, 240), { code: 'unknown_track' });
  assert.throws(() => room.setVideoSize('TR_v', 320, 0), { code: 'invalid_argument' });
  assert.equal(sent.length, 2);
});

test('an SFU that does not know video_size is no error: the client stops sending it', () => {
  const { room, events, sent } = fakeRoom();
  room.setVideoSize('TR_v', 320, 240);
  room.receive(JSON.stringify({ type: 'error', code: 'unknown_type', message: "unknown message type 'video_size'", fatal: false }));
  assert.deepEqual(events.filter((e) => e.type === 'error'), []);
  room.setVideoSize('TR_v', 640, 480);
  assert.equal(sent.length, 1);
  // Other unknown_type errors are still reported.
  room.receive(JSON.stringify({ type: 'error', code: 'unknown_type', message: "unknown message type 'x'", fatal: false }));
  assert.equal(events.filter((e) => e.type === 'error').length, 1);
});

test('video_layer becomes an event with the publisher, and state that ends with the track', () => {
  const { room, events } = fakeRoom();
  room.receive(JSON.stringify({ type: 'video_layer', track: 'TR_v', paused: true, reason: 'bandwidth', layer: null, bandwidth_estimate: 90000 }));
  room.receive(JSON.stringify({ type: 'video_layer', track: 'TR_gone', paused: true, reason: 'bandwidth', layer: null }));
  room.receive(JSON.stringify({ type: 'video_layer', track: 'TR_v', paused: 'maybe' }));
  const layers = events.filter((e) => e.type === 'video_layer');
  assert.deepEqual(layers, [{ type: 'video_layer', participant: 'ada', trackId: 'TR_v', paused: true, reason: 'bandwidth', layer: null, bandwidthEstimate: 90000 }]);
  assert.deepEqual(room.videoLayer('TR_v'), { trackId: 'TR_v', paused: true, reason: 'bandwidth', layer: null, bandwidthEstimate: 90000 });
  assert.equal(room.videoLayer('TR_gone'), null);
  room.setVideoSize('TR_v', 160, 120);
  room.receive(JSON.stringify({ type: 'track_unpublished', track: 'TR_v' }));
  assert.equal(room.videoLayer('TR_v'), null);
  assert.equal(room.videoSizes.has('TR_v'), false);
});

test('observeVideoSize sends the element size once it holds still, and 0 x 0 when hidden', (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  /** @type {(() => void)[]} */
  const observers = [];
  let disconnected = 0;
  globalThis.ResizeObserver = /** @type {any} */ (class {
    /** @param {() => void} callback */
    constructor(callback) { this.callback = callback; }
    observe() { observers.push(this.callback); }
    disconnect() { disconnected++; }
  });
  t.after(() => { delete globalThis.ResizeObserver; });
  const { room, sent } = fakeRoom();
  const element = { isConnected: true, box: { width: 260.4, height: 195.2 }, getBoundingClientRect() { return this.box; } };
  const stop = room.observeVideoSize('TR_v', element, { pixelDensity: 2 });
  const resized = () => observers.forEach((cb) => cb());
  resized();
  t.mock.timers.tick(100);
  element.box = { width: 640, height: 480 };
  resized();
  t.mock.timers.tick(249);
  assert.deepEqual(sent, [], 'nothing while it is still changing');
  t.mock.timers.tick(1);
  assert.deepEqual(sent, [{ type: 'video_size', track: 'TR_v', width: 1280, height: 960 }]);
  element.box = { width: 0, height: 0 };
  resized();
  t.mock.timers.tick(250);
  assert.deepEqual(sent.at(-1), { type: 'video_size', track: 'TR_v', width: 0, height: 0 });
  stop();
  assert.equal(disconnected, 1);
  element.box = { width: 100, height: 100 };
  resized();
  t.mock.timers.tick(1000);
  assert.equal(sent.length, 2);
  // A track that ends stops its watcher.
  room.observeVideoSize('TR_v', element);
  room.trackUnpublished('TR_v');
  assert.equal(disconnected, 2);
  mock.timers.reset();
});

// --- joining through a cluster node that redirects -----------------------------------------------

/** A WebSocket stand-in: answers each join with the next of `answers` (by URL), records joins. */
function scriptedSockets(answers) {
  /** @type {{url: string, join: any}[]} */
  const opened = [];
  class ScriptedSocket {
    static OPEN = 1;
    constructor(/** @type {string} */ url) {
      this.url = url;
      this.readyState = 1;
      setTimeout(() => this.onopen?.(), 0);
    }
    send(/** @type {string} */ text) {
      const join = JSON.parse(text);
      opened.push({ url: this.url, join });
      const answer = answers.shift();
      setTimeout(() => this.onmessage?.({ data: JSON.stringify(answer) }), 0);
    }
    close() { this.readyState = 3; }
  }
  return { ScriptedSocket, opened };
}

/** Replace the global WebSocket for one test (this Node has no t.mock.property). */
function useSocket(/** @type {any} */ t, /** @type {any} */ socket) {
  const saved = globalThis.WebSocket;
  globalThis.WebSocket = socket;
  t.after(() => { globalThis.WebSocket = saved; });
}

const JOINED = { type: 'joined', participant: { id: 'me', identity: 'me', name: null, kind: 'rtc', slot: 1 }, resume_token: 'rt', participants: [], tracks: [] };

test('a redirect is followed with the same join, and the room node stays the URL', async (t) => {
  const { ScriptedSocket, opened } = scriptedSockets([
    { type: 'redirect', node: 'n2', url: 'ws://127.0.0.1:9002/rtc' },
    JOINED,
  ]);
  useSocket(t, ScriptedSocket);
  const room = /** @type {any} */ (new BlindfoldRoom({ token: TOKEN, passphrase: 'p', url: 'http://127.0.0.1:9001' }));
  const joined = await room.connect(false);
  assert.equal(joined.type, 'joined');
  assert.deepEqual(opened.map((o) => o.url), ['ws://127.0.0.1:9001/rtc', 'ws://127.0.0.1:9002/rtc']);
  assert.deepEqual(opened[1].join, opened[0].join);
  assert.equal(opened[1].join.token, TOKEN);
  assert.equal(room.url, 'ws://127.0.0.1:9002/rtc');
});

test('more than three redirects fail the join with a clear error', async (t) => {
  const hop = { type: 'redirect', node: 'n', url: 'ws://127.0.0.1:9003/rtc' };
  const { ScriptedSocket, opened } = scriptedSockets([hop, hop, hop, hop, JOINED]);
  useSocket(t, ScriptedSocket);
  const room = /** @type {any} */ (new BlindfoldRoom({ token: TOKEN, passphrase: 'p', url: 'http://127.0.0.1:9001' }));
  await assert.rejects(room.connect(false), (err) => err instanceof BlindfoldError && err.code === 'too_many_redirects');
  assert.equal(opened.length, 4);
});

// --- rejoining after the media or the node is gone ------------------------------------------------

/**
 * Stand-ins for the browser and a set of SFU nodes, by socket URL: sockets to a URL in `dead`
 * close before opening, as a dead node's would; every node answers a fresh join with a new
 * participant (new id and slot) and refuses a resume (`resume`, overridable), and answers
 * publish offers. Everything the client sends is recorded with the URL it went to.
 */
function fakeNetwork(/** @type {any} */ t) {
  const net = {
    /** @type {Set<string>} */ dead: new Set(),
    /** @type {any[]} */ sockets: [],
    /** @type {{url: string, message: any}[]} */ sent: [],
    /** @type {any[]} */ pcs: [],
    /** @type {any[]} */ workers: [],
    /** @type {(url: string, join: any) => any} */
    join: (_url, _join) => null,
    nextId: 1,
    /** Everything of `type` the client sent, with where it went. */
    of(/** @type {string} */ type) { return net.sent.filter((s) => s.message.type === type); },
  };
  const ada = { id: 'ada', identity: 'ada', name: 'Ada', kind: 'rtc', slot: 1 };
  net.join = (_url, join) => {
    if (join.resume !== undefined) return { type: 'error', code: 'resume_failed', message: 'nothing to resume', fatal: true };
    const n = ++net.nextId;
    return {
      type: 'joined', version: 1, resumed: false,
      participant: { id: `me${n}`, identity: 'me', name: null, kind: 'rtc', slot: n },
      resume_token: `rt${n}`, participants: [ada], ice_servers: [],
      tracks: [{ id: `TR_ada_${n}`, participant: 'ada', kind: 'video', codec: 'VP8', stream: 's', muted: false }],
    };
  };
  class FakeSocket {
    static OPEN = 1;
    constructor(/** @type {string} */ url) {
      this.url = url;
      this.readyState = 0;
      /** @type {number|null} */ this.closedWith = null;
      /** @type {(() => void)[]} */ this.closeListeners = [];
      net.sockets.push(this);
      setTimeout(() => {
        if (net.dead.has(url)) this.drop();
        else { this.readyState = 1; this.onopen?.(); }
      }, 0);
    }
    send(/** @type {string} */ text) {
      const message = JSON.parse(text);
      net.sent.push({ url: this.url, message });
      if (message.type === 'join') this.deliver(net.join(this.url, message));
      else if (message.type === 'publish_offer') this.deliver({ type: 'publish_answer', sdp: 'v=0\r\n' });
      else if (message.type === 'leave') this.close(1000);
    }
    deliver(/** @type {any} */ message) {
      setTimeout(() => { if (this.readyState === 1) this.onmessage?.({ data: JSON.stringify(message) }); }, 0);
    }
    addEventListener(/** @type {string} */ type, /** @type {() => void} */ fn) { if (type === 'close') this.closeListeners.push(fn); }
    close(code = 1005) {
      if (this.readyState === 3) return;
      this.closedWith = code;
      this.end(code);
    }
    /** The connection is lost without a closing handshake (a node that died). */
    drop() { this.end(1006); }
    end(/** @type {number} */ code) {
      this.readyState = 3;
      setTimeout(() => { this.onclose?.({ code }); this.closeListeners.forEach((fn) => fn()); }, 0);
    }
  }
  class FakePeerConnection {
    constructor() {
      /** @type {any[]} */ this.transceivers = [];
      this.closed = false;
      this.signalingState = 'stable';
      this.connectionState = 'new';
      this.localDescription = null;
      net.pcs.push(this);
    }
    addTransceiver(/** @type {any} */ track, /** @type {any} */ init) {
      const transceiver = { mid: null, sender: { track }, receiver: {}, init, currentDirection: null };
      this.transceivers.push(transceiver);
      return transceiver;
    }
    getTransceivers() { return this.transceivers; }
    async createOffer() { return { type: 'offer', sdp: 'v=0\r\n' }; }
    async setLocalDescription(/** @type {any} */ d) { this.localDescription = d; this.signalingState = 'have-local-offer'; }
    async setRemoteDescription(/** @type {any} */ d) { this.remoteDescription = d; this.signalingState = 'stable'; }
    close() { this.closed = true; this.signalingState = 'closed'; }
  }
  class FakeWorker {
    constructor() { /** @type {any[]} */ this.posted = []; net.workers.push(this); }
    postMessage(/** @type {any} */ message) { this.posted.push(message); }
    terminate() {}
  }
  function FakeScriptTransform(/** @type {any} */ worker, /** @type {any} */ options) {
    this.worker = worker;
    this.options = options;
  }
  for (const [name, value] of Object.entries({
    WebSocket: FakeSocket, RTCPeerConnection: FakePeerConnection, Worker: FakeWorker,
    RTCRtpScriptTransform: FakeScriptTransform,
  })) {
    const saved = Object.getOwnPropertyDescriptor(globalThis, name);
    globalThis[name] = value;
    t.after(() => {
      if (saved === undefined) delete globalThis[name];
      else Object.defineProperty(globalThis, name, saved);
    });
  }
  return net;
}

/** A camera and a microphone. */
function localMedia() {
  const tracks = [
    { kind: 'audio', id: 'mic', enabled: true, getSettings: () => ({}) },
    { kind: 'video', id: 'cam', enabled: true, getSettings: () => ({ width: 1280, height: 720 }) },
  ];
  return { tracks, stream: { getTracks: () => tracks } };
}

/** Resolves once `check()` holds; fails the test after `ms`. */
async function until(/** @type {() => boolean} */ check, ms = 3000) {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${check}`);
    await new Promise((resolve) => { setTimeout(resolve, 5); });
  }
}

const NODE_A = 'ws://127.0.0.1:9001/rtc';
const NODE_B = 'ws://127.0.0.1:9002/rtc';

/** A joined room with camera and microphone published, on NODE_A. */
async function joinedRoom(/** @type {any} */ t, /** @type {any} */ net, /** @type {Record<string, any>} */ extra = {}) {
  /** @type {any[]} */
  const events = [];
  const media = localMedia();
  const room = /** @type {any} */ (new BlindfoldRoom({
    token: TOKEN, passphrase: 'p', name: 'Me', url: 'http://127.0.0.1:9001', media: media.stream,
    kxIterations: 1, onEvent: (e) => events.push(e), ...extra,
  }));
  // A failed test must not leave a rejoin running into the next one's stand-ins.
  t.after(() => room.shutdown('test over'));
  await room.join();
  assert.equal(net.of('publish_offer').length, 1);
  return { room, events, media };
}

test('with autoRejoin, transport_closed joins afresh on the next URL, republishes the same tracks and emits rejoined', async (t) => {
  const net = fakeNetwork(t);
  const { room, events, media } = await joinedRoom(t, net, { autoRejoin: true, fallbackUrls: ['http://127.0.0.1:9002'] });
  const [firstSocket] = net.sockets;
  const [firstPublisher] = net.pcs;
  const firstJoin = net.of('join')[0].message;
  const firstKx = room.kx;
  room.setMuted('video', true);

  // The media worker for us died, and node A is gone for new sockets.
  net.dead.add(NODE_A);
  firstSocket.deliver({ type: 'error', code: 'transport_closed', message: 'media transport closed: worker died', fatal: false });
  // Both connections died with the worker: one rejoin, not two.
  firstSocket.deliver({ type: 'error', code: 'transport_closed', message: 'media transport closed: the other one', fatal: false });
  await until(() => events.some((e) => e.type === 'rejoined' || (e.type === 'error' && e.fatal)));

  const rejoined = events.find((e) => e.type === 'rejoined');
  assert.deepEqual(rejoined, { type: 'rejoined', reason: 'media transport closed: worker died', node: NODE_B });
  // The old participant was let go at once (1000: the server removes it now), its media too.
  assert.equal(firstSocket.closedWith, 1000);
  assert.equal(firstPublisher.closed, true);
  // Node A first (the current URL: it refused the socket), then B, with a fresh join.
  assert.deepEqual(net.sockets.map((s) => s.url), [NODE_A, NODE_A, NODE_B]);
  const joins = net.of('join');
  assert.equal(joins.length, 2);
  assert.equal(joins[1].url, NODE_B);
  assert.deepEqual(joins[1].message, firstJoin, 'the same join, not a resume');
  assert.equal(joins[1].message.resume, undefined);
  // The same MediaStreamTracks on a new publisher connection, each with an encrypt transform.
  const offers = net.of('publish_offer');
  assert.equal(offers.length, 2);
  assert.equal(offers[1].url, NODE_B);
  const publisher = room.publisher;
  assert.notEqual(publisher, firstPublisher);
  assert.equal(publisher.closed, false);
  assert.deepEqual(publisher.transceivers.map((tr) => tr.sender.track), media.tracks);
  assert.deepEqual(publisher.transceivers.map((tr) => tr.sender.transform.options),
    [{ operation: 'encrypt', kind: 'audio' }, { operation: 'encrypt', kind: 'video' }]);
  assert.equal(media.tracks[1].enabled, false, 'a muted camera stays muted');
  // A new participant with its own key exchange: the hello goes out on the new socket only.
  assert.equal(room.self.id, 'me3');
  assert.equal(room.url, NODE_B);
  assert.equal(room.state, 'connected');
  assert.ok(net.sent.some((s) => s.url === NODE_B && s.message.type === 'relay'));
  assert.ok(events.some((e) => e.type === 'track_removed' && e.trackId === 'TR_ada_2'), 'remote media of the old connection ends');
  assert.ok(room.tracks.has('TR_ada_3'));
  assert.deepEqual(events.filter((e) => e.type === 'connection').map((e) => e.state), ['connected', 'reconnecting', 'connected']);
  // The old exchange's late work (a delayed key switch, a hello) belongs to the participant
  // that left: it must reach neither the worker nor the new socket.
  const [worker] = net.workers;
  const posted = worker.posted.length;
  const sent = net.sent.length;
  firstKx.switchTo(firstKx.newSendKey(5));
  await firstKx.resync();
  assert.equal(worker.posted.length, posted);
  assert.equal(net.sent.length, sent);
  assert.equal(worker.posted.filter((m) => m.type === 'setSendKey').at(-1).kid >> 4n, 3n, 'the new slot sends');
  await room.leave();
  assert.equal(net.of('leave').at(-1).url, NODE_B);
});

test('without autoRejoin, transport_closed is reported and nothing else happens', async (t) => {
  const net = fakeNetwork(t);
  const { room, events } = await joinedRoom(t, net);
  net.sockets[0].deliver({ type: 'error', code: 'transport_closed', message: 'media transport closed: worker died', fatal: false });
  await until(() => events.some((e) => e.type === 'error'));
  // Longer than the first rejoin delays: a rejoin would have opened a socket by now.
  await new Promise((resolve) => { setTimeout(resolve, 400); });
  assert.deepEqual(events.filter((e) => e.type === 'error').map((e) => [e.code, e.fatal]), [['transport_closed', false]]);
  assert.equal(net.sockets.length, 1);
  assert.equal(net.of('join').length, 1);
  assert.equal(net.sockets[0].closedWith, null);
  assert.equal(net.pcs[0].closed, false);
  assert.equal(room.state, 'connected');
  assert.ok(!events.some((e) => e.type === 'rejoined'));
  await room.leave();
});

test('with autoRejoin, a dropped socket is resumed first, and rejoined only when the resume is refused', async (t) => {
  const net = fakeNetwork(t);
  const { room, events } = await joinedRoom(t, net, { autoRejoin: true });
  net.sockets[0].drop();
  await until(() => events.some((e) => e.type === 'rejoined' || (e.type === 'error' && e.fatal)));
  const joins = net.of('join').map((s) => s.message);
  assert.equal(joins.length, 3);
  assert.equal(joins[1].resume, 'rt2', 'a resume first');
  assert.equal(joins[2].resume, undefined, 'then a fresh join');
  assert.equal(events.find((e) => e.type === 'rejoined').node, NODE_A);
  assert.equal(net.of('publish_offer').length, 2);
  assert.ok(!events.some((e) => e.type === 'error'));
  await room.leave();
});

test('with autoRejoin, a node that died is rejoined through a fallback without waiting out the resume window', async (t) => {
  const net = fakeNetwork(t);
  const { room, events } = await joinedRoom(t, net, { autoRejoin: true, fallbackUrls: ['http://127.0.0.1:9002'] });
  net.dead.add(NODE_A);
  net.sockets[0].drop();
  // The resume window is 20 s; well before that the fallback node has us.
  await until(() => events.some((e) => e.type === 'rejoined' || (e.type === 'error' && e.fatal)), 2000);
  assert.equal(events.find((e) => e.type === 'rejoined').node, NODE_B);
  assert.deepEqual(net.of('join').map((s) => [s.url, s.message.resume ?? null]), [[NODE_A, null], [NODE_B, null]]);
  assert.equal(net.of('publish_offer').at(-1).url, NODE_B);
  await room.leave();
});

test('with autoRejoin and no fallbackUrls, a rejoin goes to the nodes the cluster named in joined', async (t) => {
  const net = fakeNetwork(t);
  const plainJoin = net.join;
  // Node A names B (and junk that must be ignored); B names A back.
  net.join = (url, join) => {
    const answer = plainJoin(url, join);
    if (answer.type === 'joined') {
      answer.nodes = url === NODE_A ? [NODE_B, 'javascript:alert(1)', 42, NODE_A] : [NODE_A];
    }
    return answer;
  };
  const { room, events } = await joinedRoom(t, net, { autoRejoin: true });
  assert.deepEqual(room.entryUrls, [NODE_A, NODE_B]);
  net.dead.add(NODE_A);
  net.sockets[0].drop();
  await until(() => events.some((e) => e.type === 'rejoined' || (e.type === 'error' && e.fatal)), 2000);
  assert.equal(events.find((e) => e.type === 'rejoined').node, NODE_B);
  assert.deepEqual(net.of('join').map((s) => [s.url, s.message.resume ?? null]), [[NODE_A, null], [NODE_B, null]]);
  assert.deepEqual(room.entryUrls, [NODE_A, NODE_B]);
  await room.leave();
});

test('with autoRejoin, a resumed socket stays the same participant', async (t) => {
  const net = fakeNetwork(t);
  const { room, events } = await joinedRoom(t, net, { autoRejoin: true });
  const join = net.join;
  net.join = (url, message) => (message.resume === undefined ? join(url, message)
    : { ...join(url, { ...message, resume: undefined }), participant: room.self, resume_token: 'rt2b', resumed: true });
  net.sockets[0].drop();
  await until(() => events.filter((e) => e.type === 'joined').length === 2);
  await new Promise((resolve) => { setTimeout(resolve, 100); });
  assert.equal(net.of('join').length, 2);
  assert.equal(net.of('publish_offer').length, 1);
  assert.ok(!events.some((e) => e.type === 'rejoined'));
  assert.equal(room.state, 'connected');
  await room.leave();
});

test('a rejoin refused for good gives up at once with a fatal rejoin_failed', async (t) => {
  const net = fakeNetwork(t);
  const { room, events } = await joinedRoom(t, net, { autoRejoin: true, fallbackUrls: ['http://127.0.0.1:9002'] });
  net.join = () => ({ type: 'error', code: 'token_expired', message: 'the token has expired', fatal: true });
  net.sockets[0].deliver({ type: 'error', code: 'transport_closed', message: 'media transport closed', fatal: false });
  await until(() => room.state === 'closed');
  const failed = events.find((e) => e.type === 'error' && e.code === 'rejoin_failed');
  assert.ok(failed, 'rejoin_failed is reported');
  assert.equal(failed.fatal, true);
  assert.equal(failed.cause, 'token_expired');
  assert.equal(net.of('join').length, 2, 'no retry on another node');
  assert.equal(events.at(-1).type, 'left');
  assert.ok(!events.some((e) => e.type === 'rejoined'));
});
