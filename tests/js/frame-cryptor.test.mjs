// The browser transform's frame logic (sfu/web/e2ee/frame-cryptor.js) and the worker's stream
// wiring (sfu/web/e2ee/worker.js), driven in Node with stand-ins for the encoded-frame objects.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { FrameCryptor, FrameStats, clearPrefixLen } from '../../sfu/web/e2ee/frame-cryptor.js';
import * as sf from '../../sfu/web/e2ee/sframe.js';
import { fromHex, toHex } from './helpers.mjs';

const KEY_A = fromHex('000102030405060708090a0b0c0d0e0f');
const KEY_B = fromHex('f0e0d0c0b0a090807060504030201000');
const enc = new TextEncoder();
const VP8_KEYFRAME = sf.concatBytes(fromHex('5003009d012a8002e001'), enc.encode('keyframe payload'));
const VP8_DELTA = sf.concatBytes(fromHex('b10100'), enc.encode('delta payload'));
const OPUS_FRAME = sf.concatBytes(fromHex('fc'), enc.encode('opus'));

/** A sender's and a receiver's cryptor sharing KID 0x10. */
async function pair() {
  const tx = new FrameCryptor({ unknownKidWaitMs: 0 });
  const rx = new FrameCryptor({ unknownKidWaitMs: 0 });
  await tx.setSendKey(0x10n, KEY_A);
  await rx.addReceiveKey(0x10n, KEY_A);
  return { tx, rx };
}

test('frames the cryptor protects are the Python format examples', async () => {
  // docs/e2ee.md section 9: base key 00..0f, KID 0x10, counters 0, 1, 2.
  const { tx, rx } = await pair();
  const expected = [
    [VP8_KEYFRAME, 'video', '5003009d012a8002e0018010f89dea327fea7c13507734a6993576e3212c29c9ded8cd125abf07208262a7bb'],
    [VP8_DELTA, 'video', 'b1010081106e841d619f242f32d83e00ec32a4f16d7319adbb54b226150772c4d40d'],
    [OPUS_FRAME, 'audio', '8210126a5e435a0156c643ecfd5553597b2f558fbb95d7'],
  ];
  for (const [frame, kind, hex] of expected) {
    const out = await tx.encryptFrame(frame, kind);
    assert.equal(out.status, 'ok');
    assert.equal(out.kid, 0x10n);
    assert.equal(toHex(out.data), hex);
    const back = await rx.decryptFrame(out.data, kind);
    assert.equal(back.status, 'ok');
    assert.equal(back.kid, 0x10n);
    assert.deepEqual(back.data, frame);
  }
});

test('clear prefix: VP8 by the keyframe bit, Opus none, other codecs refused', () => {
  assert.equal(clearPrefixLen('video', undefined, VP8_KEYFRAME), 10);
  assert.equal(clearPrefixLen('video', 'video/VP8', VP8_DELTA), 3);
  assert.equal(clearPrefixLen('audio', 'audio/opus', OPUS_FRAME), 0);
  assert.equal(clearPrefixLen('audio', undefined, OPUS_FRAME), 0);
  assert.equal(clearPrefixLen('video', 'video/H264', VP8_KEYFRAME), null);
  assert.equal(clearPrefixLen('audio', 'audio/PCMU', OPUS_FRAME), null);
});

test('zero-length frames pass through both ways without using a counter', async () => {
  const { tx, rx } = await pair();
  for (const kind of ['audio', 'video']) {
    assert.deepEqual(await tx.encryptFrame(new Uint8Array(0), kind), { status: 'empty', data: new Uint8Array(0) });
    assert.deepEqual(await rx.decryptFrame(new Uint8Array(0), kind), { status: 'empty', data: new Uint8Array(0) });
  }
  const first = await tx.encryptFrame(OPUS_FRAME, 'audio');
  assert.equal(sf.decodeHeader(first.data).ctr, 0n);
});

test('no send key: frames are dropped, never sent in the clear', async () => {
  const tx = new FrameCryptor();
  assert.deepEqual(await tx.encryptFrame(OPUS_FRAME, 'audio'), { status: 'no-key' });
  assert.deepEqual(await tx.encryptFrame(VP8_KEYFRAME, 'video', 'video/H264'), { status: 'unsupported' });
});

test('a VP8 keyframe shorter than its clear prefix is dropped', async () => {
  const { tx } = await pair();
  assert.deepEqual(await tx.encryptFrame(VP8_KEYFRAME.subarray(0, 9), 'video'), { status: 'malformed' });
});

test('audio and video share one counter, even when started concurrently', async () => {
  const { tx, rx } = await pair();
  const outs = await Promise.all(Array.from({ length: 40 }, (_, i) => (i % 2
    ? tx.encryptFrame(VP8_DELTA, 'video')
    : tx.encryptFrame(OPUS_FRAME, 'audio'))));
  const ctrs = outs.map((o, i) => sf.decodeHeader(o.data, i % 2 ? 3 : 0).ctr);
  assert.deepEqual(new Set(ctrs).size, 40);
  for (const [i, o] of outs.entries()) {
    assert.equal((await rx.decryptFrame(o.data, i % 2 ? 'video' : 'audio')).status, 'ok');
  }
});

test('setting the same send key again does not restart its counter', async () => {
  const { tx } = await pair();
  await tx.encryptFrame(OPUS_FRAME, 'audio');
  await tx.setSendKey(0x10n, Uint8Array.from(KEY_A));
  const out = await tx.encryptFrame(OPUS_FRAME, 'audio');
  assert.equal(sf.decodeHeader(out.data).ctr, 1n);
  // A new key (the next generation) starts its own counter at 0.
  await tx.setSendKey(0x11n, KEY_B);
  const next = await tx.encryptFrame(OPUS_FRAME, 'audio');
  assert.deepEqual(sf.decodeHeader(next.data), { kid: 0x11n, ctr: 0n, end: 2 });
});

test('receive: wrong key, altered frames and unknown KIDs are dropped', async () => {
  const { tx } = await pair();
  const wrong = new FrameCryptor({ unknownKidWaitMs: 0 });
  await wrong.addReceiveKey(0x10n, KEY_B);
  const out = await tx.encryptFrame(VP8_KEYFRAME, 'video');
  assert.deepEqual(await wrong.decryptFrame(out.data, 'video'), { status: 'auth-failed', kid: 0x10n });

  const rx = new FrameCryptor({ unknownKidWaitMs: 0 });
  await rx.addReceiveKey(0x10n, KEY_A);
  const altered = Uint8Array.from(out.data);
  altered[altered.length - 1] ^= 1;
  assert.deepEqual(await rx.decryptFrame(altered, 'video'), { status: 'auth-failed', kid: 0x10n });
  // Flipping the keyframe bit moves where the receiver looks for the header: never decoded.
  const flipped = Uint8Array.from(out.data);
  flipped[0] ^= 1;
  // (Here the receiver reads start-code bytes as a header naming another KID.)
  const misread = await rx.decryptFrame(flipped, 'video');
  assert.ok(['auth-failed', 'malformed', 'unknown-kid'].includes(misread.status));
  assert.equal(misread.data, undefined);
  assert.deepEqual(await rx.decryptFrame(Uint8Array.of(0xb1, 1, 0, 0x80), 'video'), { status: 'malformed' });

  const stranger = new FrameCryptor();
  await stranger.setSendKey(0x20n, KEY_A);
  const theirs = await stranger.encryptFrame(OPUS_FRAME, 'audio');
  assert.deepEqual(await rx.decryptFrame(theirs.data, 'audio'), { status: 'unknown-kid', kid: 0x20n });
  rx.removeReceiveKey(0x10n);
  assert.equal((await rx.decryptFrame(out.data, 'video')).status, 'unknown-kid');
});

test('a frame whose key is still on its way waits for it, once', async () => {
  const tx = new FrameCryptor();
  await tx.setSendKey(0x30n, KEY_A);
  const rx = new FrameCryptor({ unknownKidWaitMs: 2000 });
  const out = await tx.encryptFrame(OPUS_FRAME, 'audio');
  const started = Date.now();
  const pending = rx.decryptFrame(out.data, 'audio');
  setTimeout(() => { rx.addReceiveKey(0x30n, KEY_A); }, 20);
  const result = await pending;
  assert.equal(result.status, 'ok');
  assert.ok(Date.now() - started < 1500);

  const impatient = new FrameCryptor({ unknownKidWaitMs: 30 });
  assert.equal((await impatient.decryptFrame(out.data, 'audio')).status, 'unknown-kid');
  const t0 = Date.now();
  // The wait timed out once for this KID: later frames are dropped at once.
  assert.equal((await impatient.decryptFrame(out.data, 'audio')).status, 'unknown-kid');
  assert.ok(Date.now() - t0 < 25);
});

test('FrameStats counts per status', () => {
  const stats = new FrameStats();
  for (const status of ['ok', 'ok', 'empty', 'no-key', 'unknown-kid', 'auth-failed', 'malformed', 'unsupported']) {
    stats.record({ status, kid: status === 'ok' ? 0x10n : undefined });
  }
  assert.deepEqual(stats.toJSON(), {
    ok: 2, empty: 1, noKey: 1, unknownKid: 1, authFailed: 1, malformed: 1, unsupported: 1, dropped: 5, lastKid: '0x10',
  });
});

// --- worker.js with stand-in streams and frames ----------------------------------------------

/** Load worker.js with a fake worker global; returns what it posted and its handlers. */
async function loadWorker() {
  /** @type {any[]} */
  const posted = [];
  const fakeSelf = { postMessage: (m) => { posted.push(m); }, onmessage: null, onrtctransform: null };
  globalThis.self = /** @type {any} */ (fakeSelf);
  // A fresh module instance per test (query string), so state does not leak between tests.
  await import(`../../sfu/web/e2ee/worker.js?instance=${Math.random()}`);
  fakeSelf.onmessage({ data: { type: 'statsInterval', ms: 0 } });
  return { posted, fakeSelf };
}

/**
 * Frames shaped like RTCEncodedVideoFrame / RTCEncodedAudioFrame.
 * @param {Uint8Array} bytes
 * @param {'audio'|'video'} kind
 */
function encodedFrame(bytes, kind) {
  const frame = { data: bytes.slice().buffer, getMetadata: () => ({ mimeType: kind === 'video' ? 'video/VP8' : 'audio/opus' }) };
  if (kind === 'video') frame.type = bytes.length === 0 ? 'empty' : (bytes[0] & 1 ? 'delta' : 'key');
  return frame;
}

/**
 * Push frames through one attached transform and collect what comes out.
 * @param {(readable: ReadableStream, writable: WritableStream) => void} attachFn
 * @param {any[]} frames
 */
async function run(attachFn, frames) {
  const out = [];
  const readable = new ReadableStream({
    start(controller) {
      for (const f of frames) controller.enqueue(f);
      controller.close();
    },
  });
  let done;
  const finished = new Promise((resolve) => { done = resolve; });
  const writable = new WritableStream({ write(f) { out.push(f); }, close() { done(); } });
  attachFn(readable, writable);
  await finished;
  await new Promise((resolve) => setImmediate(resolve));
  return out;
}

test('worker: encrypt via onrtctransform, decrypt via posted streams, stats posted', async () => {
  const { posted, fakeSelf } = await loadWorker();
  fakeSelf.onmessage({ data: { type: 'setSendKey', kid: 0x10n, key: KEY_A } });
  fakeSelf.onmessage({ data: { type: 'addReceiveKey', kid: 0x10, key: KEY_A.buffer } });
  await new Promise((resolve) => setTimeout(resolve, 20));

  const plain = [encodedFrame(VP8_KEYFRAME, 'video'), encodedFrame(new Uint8Array(0), 'video'), encodedFrame(VP8_DELTA, 'video')];
  const sent = await run((readable, writable) => fakeSelf.onrtctransform({
    transformer: { readable, writable, options: { operation: 'encrypt', kind: 'video' } },
  }), plain);
  assert.equal(sent.length, 3);
  assert.equal(toHex(new Uint8Array(sent[0].data)), '5003009d012a8002e0018010f89dea327fea7c13507734a6993576e3212c29c9ded8cd125abf07208262a7bb');
  assert.equal(sent[1].data.byteLength, 0);

  // One frame altered in transit and one under an unknown KID: both dropped, not enqueued.
  const altered = new Uint8Array(sent[2].data.slice(0));
  altered[altered.length - 1] ^= 1;
  const incoming = [
    encodedFrame(new Uint8Array(sent[0].data), 'video'),
    encodedFrame(altered, 'video'),
    encodedFrame(new Uint8Array(sent[2].data), 'video'),
    encodedFrame(new Uint8Array(0), 'video'),
  ];
  const received = await run((readable, writable) => fakeSelf.onmessage({
    data: { type: 'stream', readable, writable, options: { operation: 'decrypt', peerId: 'p1' } },
  }), incoming);
  assert.deepEqual(received.map((f) => toHex(new Uint8Array(f.data))), [toHex(VP8_KEYFRAME), toHex(VP8_DELTA), '']);

  const stats = posted.filter((m) => m.type === 'stats');
  assert.ok(stats.length >= 2, 'stats are posted when a stream ends');
  const last = stats.flatMap((m) => m.streams).filter((s) => s.operation === 'decrypt').at(-1);
  assert.equal(last.peerId, 'p1');
  assert.equal(last.ended, true);
  assert.equal(last.ok, 2);
  assert.equal(last.authFailed, 1);
  assert.equal(last.empty, 1);
  assert.deepEqual(posted.filter((m) => m.type === 'error'), []);
});

test('worker: audio without a key is dropped and counted; bad messages are reported', async () => {
  const { posted, fakeSelf } = await loadWorker();
  const out = await run((readable, writable) => fakeSelf.onmessage({
    data: { type: 'stream', readable, writable, options: { operation: 'encrypt' } },
  }), [encodedFrame(OPUS_FRAME, 'audio'), encodedFrame(new Uint8Array(0), 'audio')]);
  assert.equal(out.length, 1);
  assert.equal(out[0].data.byteLength, 0);
  const stream = posted.filter((m) => m.type === 'stats').flatMap((m) => m.streams).at(-1);
  assert.equal(stream.noKey, 1);
  assert.equal(stream.kind, null);
  fakeSelf.onmessage({ data: { type: 'nonsense' } });
  fakeSelf.onmessage({ data: { type: 'stream', options: { operation: 'sideways' } } });
  assert.equal(posted.filter((m) => m.type === 'error').length, 2);
});
