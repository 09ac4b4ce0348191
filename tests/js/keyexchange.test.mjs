// The browser key exchange (sfu/web/e2ee/keyexchange.js): pinned cross-language vectors and
// whole-room scenarios through an in-memory relay that behaves like the SFU's blind relay
// (and, in some tests, like a hostile one).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import * as kx from '../../sfu/web/e2ee/keyexchange.js';
import { composeKid } from '../../sfu/web/e2ee/sframe.js';
import { fromHex, readJson, toHex } from './helpers.mjs';

const V = readJson('tests/client/keyexchange_vectors.json');
const ROOM = 'standup';
const PASSPHRASE = 'correct horse battery staple';
// Scenario tests use a cheap PBKDF2; the vector test below runs the real iteration count.
const FAST = 1000;

// --- Vectors (produced by the Python client) -----------------------------------------------

test('vectors: PBKDF2 room secret (real iteration count, NFC), room keys', async () => {
  assert.equal(V.pbkdf2_iterations, kx.PBKDF2_ITERATIONS);
  const secret = await kx.deriveRoomSecret(V.room, V.passphrase);
  assert.equal(toHex(secret), V.room_secret);
  assert.notEqual(V.passphrase, V.passphrase_nfd);
  assert.equal(toHex(await kx.deriveRoomSecret(V.room, V.passphrase_nfd)), V.room_secret);
  const keys = await kx.deriveRoomKeys(secret, V.room);
  assert.equal(toHex(keys.macKey), V.mac_key);
  assert.equal(toHex(keys.pairSalt), V.pair_salt);
});

test('vectors: hello MAC and the Python hello payload', async () => {
  const h = V.hello;
  const pub = fromHex(V.alice.public);
  assert.equal(toHex(kx.helloMacInput(V.room, h.sender, pub, h.ts, h.reply)), h.mac_input);
  assert.equal(toHex(await kx.helloMac(fromHex(V.mac_key), V.room, h.sender, pub, h.ts, h.reply)), h.mac);
  const message = kx.decodePayload(h.payload);
  assert.deepEqual(message, { v: 1, t: 'hello', pub: kx.toBase64(pub), ts: h.ts, reply: false, mac: kx.toBase64(fromHex(h.mac)) });
});

test('vectors: ECDH with WebCrypto-imported keys, pairwise key, key messages', async () => {
  const curve = { name: 'ECDH', namedCurve: 'P-256' };
  const alicePriv = await crypto.subtle.importKey('jwk', V.alice.jwk, curve, false, ['deriveBits']);
  const bobPub = await crypto.subtle.importKey('raw', fromHex(V.bob.public), curve, true, []);
  const { d, ...alicePublicJwk } = V.alice.jwk;
  assert.ok(d);
  const alicePub = await crypto.subtle.importKey('jwk', alicePublicJwk, curve, true, []);
  assert.equal(toHex(new Uint8Array(await crypto.subtle.exportKey('raw', alicePub))), V.alice.public);
  const shared = new Uint8Array(await crypto.subtle.deriveBits({ name: 'ECDH', public: bobPub }, alicePriv, 256));
  assert.equal(toHex(shared), V.ecdh_shared_secret);

  const a = V.alice;
  const b = V.bob;
  const info = kx.pairwiseInfo(V.room, a.id, fromHex(a.public), b.id, fromHex(b.public));
  assert.equal(toHex(info), V.pairwise_info);
  assert.deepEqual(kx.pairwiseInfo(V.room, b.id, fromHex(b.public), a.id, fromHex(a.public)), info);
  const pk = await kx.pairwiseKey(shared, fromHex(V.pair_salt), V.room, b.id, fromHex(b.public), a.id, fromHex(a.public));
  assert.equal(toHex(pk), V.pairwise_key);

  const aes = await crypto.subtle.importKey('raw', pk, 'AES-GCM', false, ['encrypt', 'decrypt']);
  for (const m of V.key_messages) {
    const aad = kx.keyMessageAad(V.room, m.sender, m.recipient, BigInt(m.kid), m.generation);
    assert.equal(toHex(aad), m.aad);
    const ct = await crypto.subtle.encrypt({ name: 'AES-GCM', iv: fromHex(m.iv), additionalData: aad }, aes, fromHex(m.media_key));
    assert.equal(toHex(new Uint8Array(ct)), m.ciphertext);
    const message = kx.decodePayload(m.payload);
    assert.deepEqual(message, { v: 1, t: 'key', kid: m.kid, gen: m.generation, iv: kx.toBase64(fromHex(m.iv)), ct: kx.toBase64(fromHex(m.ciphertext)) });
  }
});

// --- An in-memory relay ----------------------------------------------------------------------

/**
 * @typedef {{from: string, to: string|null, payload: string}} Sent
 */

/** Timers run only when the test says so. */
class FakeClock {
  constructor() {
    /** @type {Array<() => void>} */ this.timers = [];
    this.now = 1_700_000_000_000;
  }

  /** @param {number} _ms @param {() => void} fn */
  schedule = (_ms, fn) => { this.timers.push(fn); };

  nowMs = () => this.now;

  runAll() {
    const due = this.timers;
    this.timers = [];
    for (const fn of due) fn();
  }
}

class Participant {
  /**
   * @param {Relay} relay
   * @param {string} id
   * @param {number} slot
   * @param {string} passphrase
   */
  constructor(relay, id, slot, passphrase) {
    this.id = id;
    /** @type {Map<string, {kid: bigint, key: Uint8Array}[]>} */ this.keys = new Map();
    /** @type {Array<[string, string]>} */ this.rejected = [];
    /** @type {Array<[string, bigint]>} */ this.removed = [];
    /** @type {Array<{kid: bigint, key: Uint8Array}>} */ this.sendKeys = [];
    this.kx = new kx.KeyExchange(
      ROOM, id, passphrase,
      (to, payload) => relay.post({ from: id, to, payload }),
      (sender, kid, key) => {
        const list = this.keys.get(sender) ?? [];
        list.push({ kid, key });
        this.keys.set(sender, list);
      },
      (peer, reason) => { this.rejected.push([peer, reason]); },
      {
        slot,
        iterations: FAST,
        schedule: relay.clock.schedule,
        nowMs: relay.clock.nowMs,
        onSendKey: (kid, key) => { this.sendKeys.push({ kid, key }); },
        onKeyRemoved: (sender, kid) => { this.removed.push([sender, kid]); },
      },
    );
  }

  /** @param {string} sender */
  latestKeyFrom(sender) {
    const list = this.keys.get(sender) ?? [];
    return list[list.length - 1];
  }
}

class Relay {
  constructor() {
    this.clock = new FakeClock();
    /** @type {Map<string, Participant>} */ this.members = new Map();
    /** @type {Sent[]} */ this.queue = [];
    /** @type {Array<Sent & {recipient: string}>} */ this.log = [];
    /** A hostile relay rewrites deliveries here. @type {(m: Sent & {recipient: string}) => (Sent & {recipient: string})} */
    this.tamper = (m) => m;
    /** Members whose socket is down: messages to them are lost. @type {Set<string>} */
    this.offline = new Set();
  }

  /** @param {Sent} message */
  post(message) {
    assert.ok(message.payload.length <= kx.MAX_PAYLOAD_CHARS);
    this.queue.push(message);
  }

  /**
   * A participant joins: the room tells the others, then it starts.
   * @param {string} id
   * @param {number} slot
   * @param {string} [passphrase]
   */
  async join(id, slot, passphrase = PASSPHRASE) {
    const p = new Participant(this, id, slot, passphrase);
    for (const other of this.members.values()) {
      other.kx.peerJoined(id);
      p.kx.peerJoined(other.id); // the `joined` snapshot lists who is already there
    }
    this.members.set(id, p);
    await p.kx.start();
    await this.flush();
    return p;
  }

  /** @param {string} id */
  async leave(id) {
    this.members.delete(id);
    for (const other of this.members.values()) other.kx.peerLeft(id);
    await this.flush();
  }

  /** Deliver until nobody has anything more to say. */
  async flush() {
    for (;;) {
      for (const m of this.members.values()) await m.kx.idle();
      if (this.queue.length === 0) return;
      const message = this.queue.shift();
      // The server sets `from`; departed participants' queued messages are dropped.
      if (!this.members.has(message.from)) continue;
      const recipients = message.to === null
        ? [...this.members.keys()].filter((id) => id !== message.from)
        : [message.to];
      for (const recipient of recipients) {
        const target = this.members.get(recipient);
        if (target === undefined || this.offline.has(recipient)) continue;
        const delivered = this.tamper({ ...message, recipient });
        this.log.push(delivered);
        await target.kx.onRelay(delivered.from, delivered.payload);
      }
    }
  }

  async runTimers() {
    this.clock.runAll();
    await this.flush();
  }
}

/** @param {string} payload */
const typeOf = (payload) => kx.decodePayload(payload).t;

/**
 * Every participant holds every other one's current send key.
 * @param {Relay|Participant[]} group  a relay's members, or the participants listed
 */
function assertAllAgree(group) {
  const members = Array.isArray(group) ? group : [...group.members.values()];
  for (const sender of members) {
    const current = sender.kx.currentSendKey();
    assert.ok(current);
    for (const receiver of members) {
      if (receiver === sender) continue;
      const got = receiver.latestKeyFrom(sender.id);
      assert.ok(got, `${receiver.id} has no key from ${sender.id}`);
      assert.equal(got.kid, current.kid);
      assert.deepEqual(got.key, current.key);
    }
  }
}

// --- Scenarios -------------------------------------------------------------------------------

test('three participants all get each other\'s keys', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  const b = await relay.join('b', 2);
  const c = await relay.join('c', 3);
  assertAllAgree(relay);
  for (const p of [a, b, c]) {
    assert.deepEqual(p.rejected, []);
    assert.equal(p.kx.verifiedPeers().size, 2);
    assert.equal(p.kx.currentSendKey()?.kid, composeKid(Number(p.id.charCodeAt(0) - 96), 0));
    assert.equal(p.sendKeys.length, 1);
  }
  // Each participant sent each peer exactly one key message.
  const keyMessages = relay.log.filter((m) => typeOf(m.payload) === 'key');
  assert.equal(keyMessages.length, 6);
  // The SFU sees no key: no 16-byte media key appears in any payload.
  const everything = relay.log.map((m) => Buffer.from(m.payload, 'base64').toString('latin1')).join('');
  for (const p of [a, b, c]) {
    assert.ok(!everything.includes(Buffer.from(p.kx.currentSendKey().key).toString('latin1')));
    assert.ok(!everything.includes(kx.toBase64(p.kx.currentSendKey().key)));
  }
});

test('a participant with the wrong passphrase gets nothing and is rejected', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  const b = await relay.join('b', 2);
  const m = await relay.join('m', 3, 'wrong passphrase');
  assert.equal(m.keys.size, 0);
  assert.deepEqual(a.rejected, [['m', 'unverified']]);
  assert.deepEqual(b.rejected, [['m', 'unverified']]);
  assert.deepEqual(new Set(m.rejected.map(([id]) => id)), new Set(['a', 'b']));
  assert.ok(!a.kx.verifiedPeers().has('m'));
  assert.ok(!a.keys.has('m') && !b.keys.has('m'));
  // Nobody sent m a key message.
  assert.ok(!relay.log.some((x) => x.recipient === 'm' && typeOf(x.payload) === 'key'));
  assertAllAgree([a, b]);
  // m leaving triggers no rotation: it never had a key.
  await relay.leave('m');
  await relay.runTimers();
  assert.equal(a.sendKeys.length, 1);
});

test('rotation on leave: the remaining peers get a new key the leaver never sees', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  const b = await relay.join('b', 2);
  const c = await relay.join('c', 3);
  const cKnewOfA = c.latestKeyFrom('a');
  await relay.leave('c');
  // Distributed, not yet used: frames keep the old key until receivers hold the new one.
  assert.equal(a.kx.currentSendKey()?.generation, 0);
  assert.equal(b.latestKeyFrom('a').kid, composeKid(1, 1));
  await relay.runTimers();
  const next = a.kx.currentSendKey();
  assert.equal(next?.generation, 1);
  assert.equal(next?.kid, composeKid(1, 1));
  assert.notDeepEqual(next?.key, cKnewOfA.key);
  assert.deepEqual(b.latestKeyFrom('a').key, next?.key);
  assert.equal(c.keys.get('a').length, 1, 'the leaver received nothing after leaving');
  assertAllAgree(relay);
  // Superseded keys are removed after the grace period: a's and b's generation 0, and c's.
  assert.deepEqual(new Set(b.removed.map(([s, k]) => `${s}:${k}`)), new Set(['c:48', 'a:16']));
  assert.deepEqual(new Set(a.removed.map(([s, k]) => `${s}:${k}`)), new Set(['c:48', 'b:32']));
});

test('a late joiner gets current and pending keys', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  await relay.join('b', 2);
  await relay.leave('b');
  // a rotated (generation 1 pending) and d joins before the switch.
  const d = await relay.join('d', 4);
  assert.deepEqual(d.keys.get('a').map((k) => k.kid), [composeKid(1, 0), composeKid(1, 1)]);
  await relay.runTimers();
  assertAllAgree(relay);
  assert.equal(a.kx.currentSendKey()?.generation, 1);
});

test('replayed old key and hello messages are ignored', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  const b = await relay.join('b', 2);
  await relay.join('c', 3);
  const oldKey = relay.log.find((m) => m.from === 'a' && m.recipient === 'b' && typeOf(m.payload) === 'key');
  const oldHello = relay.log.find((m) => m.from === 'c' && m.recipient === 'b' && typeOf(m.payload) === 'hello');
  await relay.leave('c');
  await relay.runTimers();
  const current = b.latestKeyFrom('a');
  assert.equal(current.kid, composeKid(1, 1));
  const before = b.keys.get('a').length;
  const sentBefore = relay.log.length;

  await b.kx.onRelay(oldKey.from, oldKey.payload);
  await b.kx.onRelay(oldKey.from, oldKey.payload);
  await relay.flush();
  assert.equal(b.keys.get('a').length, before);
  assert.deepEqual(b.latestKeyFrom('a'), current);
  assert.deepEqual(b.rejected, []);

  // c's hello replayed after c left must not make b send c its new key.
  await b.kx.onRelay(oldHello.from, oldHello.payload);
  await relay.flush();
  assert.ok(!b.kx.verifiedPeers().has('c'));
  assert.equal(relay.queue.length, 0);
  assert.equal(relay.log.length, sentBefore);
  void a;
});

test('a relay that rewrites `from` is detected', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  const b = await relay.join('b', 2);
  const asIfFromB = (m) => (m.from === 'c' && m.recipient === 'a' ? { ...m, from: 'b' } : m);
  // c's hello reaches a claiming to be from b: its MAC names c, so it fails.
  relay.tamper = asIfFromB;
  const c = await relay.join('c', 3);
  assert.deepEqual(a.rejected, [['b', 'unverified']]);
  assert.ok(!a.kx.verifiedPeers().has('c'));
  assert.ok(!a.keys.has('c'));
  // Now honestly introduced, then c's next key reaches a as if from b: a opens it with its
  // pairwise key for b, and it does not authenticate.
  relay.tamper = (m) => m;
  await c.kx.resync();
  await relay.flush();
  assert.deepEqual(a.latestKeyFrom('c').key, c.kx.currentSendKey()?.key);
  relay.tamper = asIfFromB;
  await c.kx.rotate();
  await relay.flush();
  assert.deepEqual(a.rejected.at(-1), ['b', 'key-unauthenticated']);
  assert.deepEqual(a.latestKeyFrom('b').key, b.kx.currentSendKey()?.key);
  assert.equal(a.keys.get('c').length, 1);
});

test('a relay that alters payloads is detected and nothing altered is installed', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  /** @param {string} payload @param {(m: Record<string, any>) => void} edit */
  const rewrite = (payload, edit) => {
    const m = kx.decodePayload(payload);
    edit(m);
    return kx.encodePayload(m);
  };
  /** @param {string} b64 */
  const flip = (b64) => {
    const bytes = Buffer.from(b64, 'base64');
    bytes[bytes.length - 1] ^= 1;
    return bytes.toString('base64');
  };
  relay.tamper = (m) => {
    if (m.from !== 'b' || m.recipient !== 'a') return m;
    const t = typeOf(m.payload);
    if (t === 'key') return { ...m, payload: rewrite(m.payload, (x) => { x.ct = flip(x.ct); }) };
    return m;
  };
  await relay.join('b', 2);
  assert.deepEqual(a.rejected, [['b', 'key-unauthenticated']]);
  assert.ok(!a.keys.has('b'));

  // Altering the generation (to make an old key look new) also breaks authentication.
  relay.tamper = (m) => (m.from === 'c' && m.recipient === 'a' && typeOf(m.payload) === 'key'
    ? { ...m, payload: rewrite(m.payload, (x) => { x.gen = 16; }) } : m);
  await relay.join('c', 3);
  assert.deepEqual(a.rejected.at(-1), ['c', 'key-unauthenticated']);

  // An altered hello (its public key) fails the MAC.
  relay.tamper = (m) => (m.from === 'e' && m.recipient === 'a' && typeOf(m.payload) === 'hello'
    ? { ...m, payload: rewrite(m.payload, (x) => { x.ts += 1; }) } : m);
  await relay.join('e', 5);
  assert.deepEqual(a.rejected.at(-1), ['e', 'unverified']);
  assert.ok(!a.keys.has('e'));
});

test('malformed and foreign payloads are reported, not thrown', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  await a.kx.onRelay('x', 'not base64!');
  await a.kx.onRelay('x', kx.toBase64(new TextEncoder().encode('[1,2]')));
  await a.kx.onRelay('x', kx.encodePayload({ v: 2, t: 'hello' }));
  await a.kx.onRelay('x', kx.encodePayload({ v: 1, t: 'bye' }));
  await a.kx.onRelay('x', kx.encodePayload({ v: 1, t: 'hello', pub: 'AAAA', ts: 1, reply: false, mac: 'AAAA' }));
  await a.kx.onRelay('x', 'A'.repeat(kx.MAX_PAYLOAD_CHARS + 4));
  assert.deepEqual(a.rejected.map(([, r]) => r),
    ['malformed', 'malformed', 'unsupported-version', 'malformed', 'malformed', 'malformed']);
  await a.kx.onRelay('a', 'ignored: from ourselves');
  assert.equal(a.rejected.length, 6);
});

test('messages that arrive before start() are kept', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  const late = new Participant(relay, 'b', 2, PASSPHRASE);
  relay.members.set('b', late);
  await a.kx.resync();
  await relay.flush(); // a's hello reaches b before b has started
  assert.equal(late.keys.size, 0);
  await late.kx.start();
  assert.deepEqual(late.kx.verifiedPeers(), new Set(['a'])); // handled inside start()
  await relay.flush();
  assertAllAgree(relay);
});

test('resync recovers keys missed while offline', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  const b = await relay.join('b', 2);
  await relay.join('c', 3);
  relay.offline.add('a');
  await relay.leave('c'); // b rotates; its new key to a is lost
  await relay.runTimers();
  assert.equal(b.kx.currentSendKey()?.kid, composeKid(2, 1));
  assert.notDeepEqual(a.latestKeyFrom('b').key, b.kx.currentSendKey()?.key);
  relay.offline.clear();
  await a.kx.resync();
  await relay.flush();
  assertAllAgree([a, b]);
  assert.deepEqual([...a.rejected, ...b.rejected], []);
  // The resync hello replayed later changes nothing (same ts: a duplicate).
  const hello = relay.log.findLast((m) => m.from === 'a' && typeOf(m.payload) === 'hello');
  const sent = relay.log.length;
  await b.kx.onRelay(hello.from, hello.payload);
  await relay.flush();
  assert.equal(relay.log.length, sent);
});

test('unverified peers, and a bad hello is answered once', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  const b = await relay.join('b', 2);
  const m = await relay.join('m', 3, 'wrong passphrase');
  assert.deepEqual(a.kx.unverifiedPeers(), new Set(['m']));
  assert.deepEqual(b.kx.unverifiedPeers(), new Set(['m']));
  assert.deepEqual(m.kx.unverifiedPeers(), new Set(['a', 'b']));
  const mHello = relay.log.find((x) => x.from === 'm' && x.recipient === 'a');
  for (let i = 0; i < 5; i++) await a.kx.onRelay(mHello.from, mHello.payload);
  await relay.flush();
  const answers = relay.log.filter((x) => x.from === 'a' && x.recipient === 'm');
  assert.equal(answers.length, 1);
  assert.equal(typeOf(answers[0].payload), 'hello');
  await relay.leave('m');
  assert.deepEqual(a.kx.unverifiedPeers(), new Set());
});

test('a peer that restarts under the same id is re-keyed', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  await relay.join('b', 2);
  relay.clock.now += 5000;
  relay.members.delete('b');
  const b2 = await relay.join('b', 2); // same id, new KeyExchange (page reload)
  assertAllAgree(relay);
  assert.deepEqual(a.latestKeyFrom('b').key, b2.kx.currentSendKey()?.key);
  assert.deepEqual(a.rejected, []);
});

test('a second peer claiming a KID already in use is refused', async () => {
  const relay = new Relay();
  const a = await relay.join('a', 1);
  await relay.join('b', 2);
  await relay.join('z', 2); // the control plane (or a lying SFU) gave z b's slot
  assert.deepEqual(a.rejected, [['z', 'kid-conflict']]);
  assert.equal(a.latestKeyFrom('z'), undefined);
});

test('constructor checks', () => {
  const noop = () => {};
  assert.throws(() => new kx.KeyExchange(ROOM, 'a', '', noop, noop, noop, { slot: 1 }), /passphrase/);
  assert.throws(() => new kx.KeyExchange(ROOM, '', 'x', noop, noop, noop, { slot: 1 }), /participantId/);
  assert.throws(() => new kx.KeyExchange(ROOM, 'a', 'x', noop, noop, noop, /** @type {any} */ ({})), /slot/);
});
