// The browser client's simulcast and layer-selection logic (sfu/web/client/blindfold.js) that
// needs no browser: the encodings it publishes, the video_size message, the video_layer event,
// and what a BlindfoldRoom sends and emits for them, driven through stand-ins for the socket.
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
