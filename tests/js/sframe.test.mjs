// SFrame (RFC 9605) in the browser client: the RFC's Appendix C vectors, the Python client's
// pinned format examples, and the same edge cases tests/client/test_sframe.py covers.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';

import * as sf from '../../sfu/web/e2ee/sframe.js';
import { ROOT, fromHex, readJson, toHex } from './helpers.mjs';

const VECTORS = readJson('tests/client/sframe_vectors.json');
const BASE_KEY = fromHex('000102030405060708090a0b0c0d0e0f');
const OTHER_KEY = fromHex('101112131415161718191a1b1c1d1e1f');
const enc = new TextEncoder();

const VP8_KEYFRAME = sf.concatBytes(fromHex('5003009d012a8002e001'), enc.encode('keyframe payload'));
const VP8_DELTA = sf.concatBytes(fromHex('b10100'), enc.encode('delta payload'));
const OPUS_FRAME = sf.concatBytes(fromHex('fc'), enc.encode('opus'));

// Produced by the Python client (tests/client/test_sframe.py FORMAT_EXAMPLES, docs/e2ee.md
// section 9): KID compose_kid(1, 0), base key 00..0f, counters 0, 1, 2 in this order.
const FORMAT_EXAMPLES = [
  [VP8_KEYFRAME, 10, '5003009d012a8002e0018010f89dea327fea7c13507734a6993576e3212c29c9ded8cd125abf07208262a7bb'],
  [VP8_DELTA, 3, 'b1010081106e841d619f242f32d83e00ec32a4f16d7319adbb54b226150772c4d40d'],
  [OPUS_FRAME, 0, '8210126a5e435a0156c643ecfd5553597b2f558fbb95d7'],
];

/** @param {string} hex */
const hexInt = (hex) => BigInt(hex);
/** @param {{cipher_suite: string}} v */
const suiteOf = (v) => {
  const suite = sf.CIPHER_SUITES.get(Number(v.cipher_suite));
  assert.ok(suite, `suite ${v.cipher_suite}`);
  return suite;
};

/**
 * @param {bigint|number} kid
 * @param {import('../../sfu/web/e2ee/sframe.js').CipherSuite} [suite]
 */
async function pair(kid = 0x10n, suite = sf.AES_128_GCM_SHA256_128) {
  const receiver = new sf.Receiver(suite);
  await receiver.addKey(kid, BASE_KEY);
  return { sender: await sf.Sender.create(kid, BASE_KEY, { suite }), receiver };
}

// --- RFC 9605 Appendix C -------------------------------------------------------------------

test('vector file is complete', () => {
  assert.equal(VECTORS.header.length, 289);
  assert.deepEqual(new Set(VECTORS.sframe.map((v) => v.cipher_suite)), new Set(['0x0004', '0x0005']));
});

test('sizes agree with the limits the Python client and the server are held to', () => {
  // The same "limits" pin sfu/client/sframe.py (tests/client/test_sframe.py) and the
  // server's key-free envelope check (tests/engine/test_sframe_vectors.py).
  const L = VECTORS.limits;
  assert.equal(sf.VP8_KEYFRAME_CLEAR_PREFIX_LEN, L.vp8_keyframe_clear_prefix_len);
  assert.equal(sf.vp8ClearPrefixLen(VP8_KEYFRAME), L.vp8_keyframe_clear_prefix_len);
  assert.equal(sf.VP8_DELTA_CLEAR_PREFIX_LEN, L.vp8_delta_clear_prefix_len);
  assert.equal(sf.vp8ClearPrefixLen(VP8_DELTA), L.vp8_delta_clear_prefix_len);
  assert.equal(sf.OPUS_CLEAR_PREFIX_LEN, L.opus_clear_prefix_len);
  assert.equal(sf.encodeHeader(sf.MAX_KID, sf.MAX_COUNTER).length, L.max_header_len);
  assert.deepEqual(new Set([...sf.CIPHER_SUITES.values()].map((s) => s.nt)), new Set([L.aead_tag_len]));
  assert.equal(sf.KID_GENERATION_BITS, L.kid_generation_bits);
});

test('all 289 header vectors encode and decode', () => {
  for (const v of VECTORS.header) {
    const kid = hexInt(v.kid);
    const ctr = hexInt(v.ctr);
    assert.equal(toHex(sf.encodeHeader(kid, ctr)), v.header, `${v.kid} ${v.ctr}`);
    const encoded = fromHex(v.header);
    assert.deepEqual(sf.decodeHeader(encoded), { kid, ctr, end: encoded.length });
    // Trailing ciphertext must not change what the header decodes to.
    const padded = sf.concatBytes(encoded, new Uint8Array(20).fill(0xff));
    assert.deepEqual(sf.decodeHeader(padded), { kid, ctr, end: encoded.length });
  }
});

for (const v of VECTORS.sframe) {
  test(`key derivation vector ${v.cipher_suite}`, async () => {
    const suite = suiteOf(v);
    const kid = hexInt(v.kid);
    const baseKey = fromHex(v.base_key);
    assert.equal(toHex(await sf.deriveSecret(baseKey, suite)), v.sframe_secret);
    const { keyLabel, saltLabel } = sf.deriveLabels(kid, suite);
    assert.equal(toHex(keyLabel), v.sframe_key_label);
    assert.equal(toHex(saltLabel), v.sframe_salt_label);
    const { key, salt } = await sf.deriveKeySalt(kid, baseKey, suite);
    assert.equal(toHex(key), v.sframe_key);
    assert.equal(toHex(salt), v.sframe_salt);
    const context = await sf.SFrameKey.create(kid, baseKey, suite);
    assert.equal(toHex(context.nonce(hexInt(v.ctr))), v.nonce);
  });

  test(`encrypt/decrypt vector ${v.cipher_suite}`, async () => {
    const suite = suiteOf(v);
    const kid = hexInt(v.kid);
    const ctr = hexInt(v.ctr);
    const baseKey = fromHex(v.base_key);
    const metadata = fromHex(v.metadata);
    const pt = fromHex(v.pt);
    // The vector's AAD is header || metadata: our header must be its prefix.
    assert.equal(toHex(sf.concatBytes(sf.encodeHeader(kid, ctr), metadata)), v.aad);
    const sender = await sf.Sender.create(kid, baseKey, { suite, counter: ctr });
    assert.equal(toHex(await sender.encrypt(metadata, pt)), v.ct);
    assert.equal(sender.counter, ctr + 1n);
    const receiver = new sf.Receiver(suite);
    await receiver.addKey(kid, baseKey);
    assert.equal(toHex(await receiver.decrypt(metadata, fromHex(v.ct))), v.pt);
  });

  test(`clear prefix is the RFC's metadata ${v.cipher_suite}`, async () => {
    const suite = suiteOf(v);
    const kid = hexInt(v.kid);
    const metadata = fromHex(v.metadata);
    const frame = sf.concatBytes(metadata, fromHex(v.pt));
    const sender = await sf.Sender.create(kid, fromHex(v.base_key), { suite, counter: hexInt(v.ctr) });
    const protectedFrame = await sender.protect(frame, metadata.length);
    assert.equal(toHex(protectedFrame), v.metadata + v.ct);
    const receiver = new sf.Receiver(suite);
    await receiver.addKey(kid, fromHex(v.base_key));
    assert.deepEqual(await receiver.unprotect(protectedFrame, metadata.length), frame);
  });
}

// --- Cross-language: frames the Python client produced -------------------------------------

test('Python format examples protect and unprotect byte for byte', async () => {
  const kid = sf.composeKid(1, 0);
  assert.equal(kid, 0x10n);
  const sender = await sf.Sender.create(kid, BASE_KEY);
  const receiver = new sf.Receiver();
  await receiver.addKey(kid, BASE_KEY);
  for (const [frame, prefixLen, expected] of FORMAT_EXAMPLES) {
    assert.equal(sf.vp8ClearPrefixLen(frame) === prefixLen || prefixLen === 0, true);
    assert.equal(toHex(await sender.protect(frame, prefixLen)), expected);
    assert.deepEqual(await receiver.unprotect(fromHex(expected), prefixLen), frame);
  }
});

test('docs/e2ee.md still pins the same examples', () => {
  const doc = readFileSync(join(ROOT, 'docs', 'e2ee.md'), 'utf8');
  for (const [, , expected] of FORMAT_EXAMPLES) assert.ok(doc.includes(expected), expected);
});

// --- Layout ---------------------------------------------------------------------------------

for (const suite of sf.CIPHER_SUITES.values()) {
  for (const prefixLen of [0, 1, 3, 10]) {
    test(`round trip ${suite.name} prefix ${prefixLen}`, async () => {
      const { sender, receiver } = await pair(0x10n, suite);
      const sizes = [Math.max(prefixLen, 1), prefixLen + 1, 17, 79, 255, 256, 1200, 65535, 200000];
      for (const size of sizes) {
        const frame = globalThis.crypto.getRandomValues(new Uint8Array(Math.min(size, 65536)));
        const full = size > 65536 ? sf.concatBytes(frame, new Uint8Array(size - 65536).fill(7)) : frame;
        const ctr = sender.counter;
        const out = await sender.protect(full, prefixLen);
        const header = sf.encodeHeader(sender.kid, ctr);
        assert.deepEqual(out.subarray(0, prefixLen), full.subarray(0, prefixLen));
        assert.deepEqual(out.subarray(prefixLen, prefixLen + header.length), header);
        assert.equal(out.length, size + header.length + suite.nt);
        assert.deepEqual(await receiver.unprotect(out, prefixLen), full);
      }
    });
  }
}

test('VP8 receivers derive the prefix from the protected frame', async () => {
  const { sender, receiver } = await pair();
  for (const [template, expected] of [[VP8_KEYFRAME, 10], [VP8_DELTA, 3]]) {
    for (const extra of [0, 1, 16, 1500]) {
      const frame = sf.concatBytes(template.subarray(0, expected), new Uint8Array(extra).fill(0x41));
      assert.equal(sf.vp8ClearPrefixLen(frame), expected);
      const out = await sender.protect(frame, sf.vp8ClearPrefixLen(frame));
      assert.equal(sf.vp8ClearPrefixLen(out), expected);
      assert.deepEqual(await receiver.unprotect(out, sf.vp8ClearPrefixLen(out)), frame);
    }
  }
});

test('vp8ClearPrefixLen and clearPrefixLenFor', () => {
  assert.equal(sf.vp8ClearPrefixLen(new Uint8Array(0)), 0);
  for (let first = 0; first < 256; first++) {
    assert.equal(sf.vp8ClearPrefixLen(Uint8Array.of(first)), first & 1 ? 3 : 10);
  }
  assert.equal(sf.clearPrefixLenFor('VP8', VP8_KEYFRAME), 10);
  assert.equal(sf.clearPrefixLenFor('video/VP8', VP8_DELTA), 3);
  assert.equal(sf.clearPrefixLenFor('audio/opus', OPUS_FRAME), 0);
  assert.throws(() => sf.clearPrefixLenFor('H264', Uint8Array.of(0)), /no E2EE clear-prefix rule/);
});

test('zero-length frames pass through and use no counter', async () => {
  const { sender, receiver } = await pair();
  assert.equal((await sender.protect(new Uint8Array(0))).length, 0);
  assert.equal((await sender.protect(new Uint8Array(0), 10)).length, 0);
  assert.equal(sender.counter, 0n);
  assert.equal((await receiver.unprotect(new Uint8Array(0), 10)).length, 0);
});

test('a frame that is all prefix, and one shorter than its prefix', async () => {
  const { sender, receiver } = await pair();
  const out = await sender.protect(VP8_DELTA.subarray(0, 3), 3);
  assert.equal(out.length, 3 + 2 + 16);
  assert.deepEqual(await receiver.unprotect(out, 3), VP8_DELTA.subarray(0, 3));
  await assert.rejects(sender.protect(VP8_KEYFRAME.subarray(0, 9), 10), /does not fit/);
  await assert.rejects(sender.protect(enc.encode('abc'), -1), /does not fit/);
  assert.equal(sender.counter, 1n);
});

test('plaintext is not visible after the prefix', async () => {
  const { sender } = await pair();
  const out = await sender.protect(sf.concatBytes(VP8_DELTA.subarray(0, 3), new Uint8Array(64).fill(0x41)), 3);
  assert.ok(!toHex(out).includes('4141414141414141'));
});

// --- Counter ---------------------------------------------------------------------------------

test('counter increments from zero, one per frame, shared by concurrent callers', async () => {
  const { sender, receiver } = await pair();
  // Start 300 protections without awaiting in between, as concurrent transforms would.
  const outs = await Promise.all(Array.from({ length: 300 }, () => sender.protect(enc.encode('frame'))));
  assert.deepEqual(outs.map((o) => sf.decodeHeader(o).ctr), Array.from({ length: 300 }, (_, i) => BigInt(i)));
  for (const out of outs) assert.deepEqual(await receiver.unprotect(out), enc.encode('frame'));
});

test('counter encoding boundaries', async () => {
  const { receiver } = await pair();
  const cases = [[0n, 0], [7n, 0], [8n, 1], [255n, 1], [256n, 2], [65535n, 2], [65536n, 3],
    [(1n << 24n) - 1n, 3], [1n << 24n, 4], [1n << 32n, 5], [(1n << 56n) - 1n, 7], [1n << 56n, 8],
    [sf.MAX_COUNTER - 1n, 8]];
  for (const [ctr, ctrBytes] of cases) {
    const sender = await sf.Sender.create(0x10n, BASE_KEY, { counter: ctr });
    for (const expected of [ctr, ctr + 1n]) {
      const out = await sender.protect(enc.encode('x'));
      const header = sf.decodeHeader(out);
      assert.equal(header.kid, 0x10n);
      assert.equal(header.ctr, expected);
      assert.deepEqual(await receiver.unprotect(out), enc.encode('x'));
    }
    assert.equal(sf.decodeHeader(sf.encodeHeader(0x10n, ctr)).end, 2 + ctrBytes);
  }
});

test('counter exhaustion refuses to reuse nonces', async () => {
  const sender = await sf.Sender.create(0x10n, BASE_KEY, { counter: sf.MAX_COUNTER });
  assert.equal(sf.decodeHeader(await sender.protect(enc.encode('last'))).ctr, sf.MAX_COUNTER);
  await assert.rejects(sender.protect(enc.encode('one too many')), RangeError);
  await assert.rejects(sender.protect(enc.encode('still refused')), RangeError);
});

// --- Authentication --------------------------------------------------------------------------

test('tampering with any bit position of any byte fails', async () => {
  for (const [frame, codec] of [[VP8_KEYFRAME, 'VP8'], [VP8_DELTA, 'VP8'], [OPUS_FRAME, 'opus']]) {
    const { sender, receiver } = await pair(0x1234n);
    const out = await sender.protect(frame, sf.clearPrefixLenFor(codec, frame));
    const headerEnd = sf.parseEnvelope(out, sf.clearPrefixLenFor(codec, out)).end;
    for (let index = 0; index < out.length; index++) {
      for (const mask of [0x01, 0x10, 0x80]) {
        const bad = Uint8Array.from(out);
        bad[index] ^= mask;
        const prefixLen = sf.clearPrefixLenFor(codec, bad);
        await assert.rejects(receiver.unprotect(bad, prefixLen), sf.SFrameError);
        if (index >= headerEnd) {
          await assert.rejects(receiver.unprotect(bad, prefixLen), sf.SFrameAuthError);
        }
      }
    }
  }
});

test('truncated or extended frames fail', async () => {
  const { sender, receiver } = await pair();
  const out = await sender.protect(VP8_DELTA, 3);
  for (let cut = 1; cut < out.length; cut++) {
    await assert.rejects(receiver.unprotect(out.subarray(0, cut), 3), sf.SFrameError);
  }
  await assert.rejects(receiver.unprotect(sf.concatBytes(out, Uint8Array.of(0)), 3), sf.SFrameAuthError);
});

test('wrong key, relabelled KID, wrong suite and wrong prefix length fail', async () => {
  const sender = await sf.Sender.create(0x10n, BASE_KEY);
  const wrongKey = new sf.Receiver();
  await wrongKey.addKey(0x10n, OTHER_KEY);
  await assert.rejects(wrongKey.unprotect(await sender.protect(VP8_DELTA, 3), 3), sf.SFrameAuthError);

  const relabelled = new sf.Receiver();
  await relabelled.addKey(0x11n, BASE_KEY);
  const fresh = await sf.Sender.create(0x10n, BASE_KEY);
  const out = await fresh.protect(enc.encode('payload'));
  assert.deepEqual(out.subarray(0, 2), Uint8Array.of(0x80, 0x10));
  out[1] = 0x11;
  await assert.rejects(relabelled.unprotect(out), sf.SFrameAuthError);

  const other = await sf.Sender.create(0x10n, BASE_KEY, { suite: sf.AES_256_GCM_SHA512_128 });
  const right = new sf.Receiver();
  await right.addKey(0x10n, BASE_KEY);
  await assert.rejects(right.unprotect(await other.protect(enc.encode('payload'))), sf.SFrameAuthError);

  const key = await sender.protect(VP8_KEYFRAME, 10);
  for (const wrong of [0, 3, 9, 11]) await assert.rejects(right.unprotect(key, wrong), sf.SFrameError);
});

test('unknown KID is reported as such; keys can be added and removed', async () => {
  const sender = await sf.Sender.create(0x77n, BASE_KEY);
  const receiver = new sf.Receiver();
  await receiver.addKey(0x10n, BASE_KEY);
  const out = await sender.protect(enc.encode('payload'));
  await assert.rejects(receiver.unprotect(out), (err) => err instanceof sf.SFrameUnknownKidError && err.kid === 0x77n);
  await receiver.addKey(0x77n, BASE_KEY);
  assert.ok(receiver.hasKey(0x77n));
  receiver.removeKey(0x77n);
  assert.ok(!receiver.hasKey(0x77n));
  receiver.removeKey(0x77n);
});

test('a removeKey during a pending addKey wins', async () => {
  const receiver = new sf.Receiver();
  const adding = receiver.addKey(0x20n, BASE_KEY);
  receiver.removeKey(0x20n);
  await adding;
  assert.ok(!receiver.hasKey(0x20n));
});

test('error hierarchy and short keys', async () => {
  assert.ok(new sf.SFrameAuthError('x') instanceof sf.SFrameError);
  assert.ok(new sf.SFrameUnknownKidError(1n) instanceof sf.SFrameError);
  await assert.rejects(sf.Sender.create(1n, new Uint8Array(15)), RangeError);
});

test('malformed headers are SFrameError', () => {
  for (const hex of ['', '80', 'f0ffffffffffffff', '08', '8f0801020304050607', '8007', '900001',
    '0807', '090001', 'f000000000000000ff']) {
    assert.throws(() => sf.decodeHeader(fromHex(hex)), (err) => err.constructor === sf.SFrameError, hex);
  }
});

test('composeKid', () => {
  assert.equal(sf.composeKid(0, 0), 0n);
  assert.equal(sf.composeKid(1, 0), 0x10n);
  assert.equal(sf.composeKid(3, 17), 0x31n);
  assert.throws(() => sf.composeKid(-1, 0), RangeError);
  assert.throws(() => sf.composeKid(1n << 60n, 0), RangeError);
});
