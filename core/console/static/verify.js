// callward console: check a receipt in the browser, trusting only the public key.
//
// The same checks, in the same order, as callward.audit.verify_receipt:
//  1. the checkpoint (a C2SP signed note) carries an Ed25519 signature by the key,
//     found by its 4-byte key hash SHA-256(origin || 0x0A || 0x01 || key)[:4], over the
//     note text (origin, size, base64 root, each line ending in a newline);
//  2. the checkpoint's size is the receipt's tree_size;
//  3. the record bytes hash to record_hash (SHA-256) and to leaf_hash
//     (SHA-256(0x00 || record), RFC 9162), their signature verifies with the key, and
//     they are the JSON of record seq;
//  4. the inclusion proof leads from the leaf to the checkpoint's root
//     (RFC 9162 section 2.1.3.2; node = SHA-256(0x01 || left || right)).
// WebCrypto's SHA-256 and Ed25519 do the cryptography; a browser without Ed25519 is told so.
"use strict";

(function () {
  const button = document.getElementById("verify");
  if (!button) {
    return;
  }
  const output = document.getElementById("verify-result");
  const EM_DASH = "\u2014";
  const SPKI_ED25519_PREFIX = "302a300506032b6570032100";

  class Invalid extends Error {}

  function show(verdict, text) {
    output.dataset.verdict = verdict;
    output.className = verdict === "valid" ? "ok" : "error";
    output.textContent = text;
  }

  function fromBase64(text, what) {
    let binary;
    try {
      binary = atob(text.trim());
    } catch (e) {
      throw new Invalid(what + " is not base64");
    }
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) {
      bytes[i] = binary.charCodeAt(i);
    }
    return bytes;
  }

  function toBase64(bytes) {
    let binary = "";
    for (const b of bytes) {
      binary += String.fromCharCode(b);
    }
    return btoa(binary);
  }

  function fromHex(text, what) {
    if (typeof text !== "string" || !/^[0-9a-f]{64}$/.test(text)) {
      throw new Invalid(what + " is not a 64-digit hex SHA-256");
    }
    const bytes = new Uint8Array(32);
    for (let i = 0; i < 32; i++) {
      bytes[i] = parseInt(text.substr(i * 2, 2), 16);
    }
    return bytes;
  }

  function toHex(bytes) {
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function concat(...parts) {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }

  function equal(a, b) {
    return a.length === b.length && a.every((v, i) => v === b[i]);
  }

  async function sha256(bytes) {
    return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  }

  const leafHash = (data) => sha256(concat(Uint8Array.of(0), data));
  const nodeHash = (left, right) => sha256(concat(Uint8Array.of(1), left, right));

  // The raw 32-byte key from base64 raw, base64 SPKI, or a PEM block.
  function rawKey(text) {
    const body = text.replace(/-----(BEGIN|END) PUBLIC KEY-----/g, "").replace(/\s+/g, "");
    const bytes = fromBase64(body, "the public key");
    if (bytes.length === 32) {
      return bytes;
    }
    if (bytes.length === 44 && toHex(bytes.slice(0, 12)) === SPKI_ED25519_PREFIX) {
      return bytes.slice(12);
    }
    throw new Invalid("the public key is not an Ed25519 key (32 raw bytes, or SPKI/PEM)");
  }

  async function importKey(raw) {
    try {
      return await crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]);
    } catch (e) {
      if (e && e.name === "NotSupportedError") {
        throw new Unsupported();
      }
      throw new Invalid("the public key cannot be imported: " + e);
    }
  }

  class Unsupported extends Error {}

  async function ed25519(key, signature, data) {
    try {
      return await crypto.subtle.verify({ name: "Ed25519" }, key, signature, data);
    } catch (e) {
      return false;
    }
  }

  async function openCheckpoint(note, key, raw) {
    if (typeof note !== "string") {
      throw new Invalid("the receipt's checkpoint is missing or not text");
    }
    const split = note.lastIndexOf("\n\n");
    if (split < 0 || !note.endsWith("\n")) {
      throw new Invalid("the checkpoint is not a signed note (text, blank line, signatures)");
    }
    const text = note.slice(0, split + 1);
    const lines = text.split("\n");
    if (lines.length !== 4) {
      throw new Invalid("the checkpoint text is not origin, size and root hash lines");
    }
    const [origin, sizeText, rootText] = lines;
    if (!/^(0|[1-9][0-9]{0,18})$/.test(sizeText)) {
      throw new Invalid("the checkpoint tree size is not a decimal number");
    }
    const root = fromBase64(rootText, "the checkpoint root hash");
    if (root.length !== 32) {
      throw new Invalid("the checkpoint root hash is not 32 bytes");
    }
    const encoder = new TextEncoder();
    const keyHash = (await sha256(concat(encoder.encode(origin + "\n"), Uint8Array.of(1), raw)))
      .slice(0, 4);
    let verified = false;
    for (const line of note.slice(split + 2, -1).split("\n")) {
      const parts = line.split(" ");
      if (parts.length !== 3 || parts[0] !== EM_DASH) {
        throw new Invalid("a checkpoint signature line is not '\u2014 name base64'");
      }
      const blob = fromBase64(parts[2], "a checkpoint signature");
      if (parts[1] !== origin || !equal(blob.slice(0, 4), keyHash)) {
        continue; // a signature by another key: ignored, as the signed-note spec says
      }
      if (!(await ed25519(key, blob.slice(4), encoder.encode(text)))) {
        throw new Invalid("the checkpoint signature does not verify with the public key");
      }
      verified = true;
    }
    if (!verified) {
      throw new Invalid("no signature by this public key is on the checkpoint");
    }
    return { origin, size: Number(sizeText), root };
  }

  async function rootFromInclusionProof(index, size, leaf, proof) {
    if (!(index >= 0 && index < size)) {
      throw new Invalid(`leaf index ${index} is outside a tree of ${size} leaves`);
    }
    let fn = index;
    let sn = size - 1;
    let r = leaf;
    for (const p of proof) {
      if (sn === 0) {
        throw new Invalid("the inclusion proof has more hashes than the tree needs");
      }
      if (fn % 2 === 1 || fn === sn) {
        r = await nodeHash(p, r);
        while (fn % 2 === 0 && fn !== 0) {
          fn = Math.floor(fn / 2);
          sn = Math.floor(sn / 2);
        }
      } else {
        r = await nodeHash(r, p);
      }
      fn = Math.floor(fn / 2);
      sn = Math.floor(sn / 2);
    }
    if (sn !== 0) {
      throw new Invalid("the inclusion proof has fewer hashes than the tree needs");
    }
    return r;
  }

  function positive(receipt, name) {
    const value = receipt[name];
    if (!Number.isSafeInteger(value) || value < 1) {
      throw new Invalid(`the receipt's ${name} is missing or not a positive integer`);
    }
    return value;
  }

  async function verifyReceipt(receiptText, keyText) {
    let receipt;
    try {
      receipt = JSON.parse(receiptText);
    } catch (e) {
      throw new Invalid("the receipt is not JSON");
    }
    if (receipt === null || typeof receipt !== "object" || Array.isArray(receipt)) {
      throw new Invalid("the receipt is not a JSON object");
    }
    if ("format" in receipt && receipt.format !== "callward-receipt/1") {
      throw new Invalid("the receipt format is not callward-receipt/1");
    }
    const raw = rawKey(keyText);
    const key = await importKey(raw);
    const seq = positive(receipt, "seq");
    const treeSize = positive(receipt, "tree_size");
    const recordHash = fromHex(receipt.record_hash, "the receipt's record_hash");
    const leaf = fromHex(receipt.leaf_hash, "the receipt's leaf_hash");
    if (!Array.isArray(receipt.inclusion_proof) || receipt.inclusion_proof.length > 64) {
      throw new Invalid("the receipt's inclusion_proof is not a list of hashes");
    }
    const proof = receipt.inclusion_proof.map((h, i) => fromHex(h, `inclusion_proof[${i}]`));
    const checkpoint = await openCheckpoint(receipt.checkpoint, key, raw);
    if (checkpoint.size !== treeSize) {
      throw new Invalid(`the receipt says tree size ${treeSize} but its checkpoint signs ` +
        checkpoint.size);
    }
    let recordChecked = false;
    if ("record" in receipt || "signature" in receipt) {
      const data = fromBase64(String(receipt.record), "the receipt's record");
      const signature = fromBase64(String(receipt.signature), "the receipt's signature");
      if (!equal(await sha256(data), recordHash)) {
        throw new Invalid("the receipt's record_hash is not the SHA-256 of its record bytes");
      }
      if (!equal(await leafHash(data), leaf)) {
        throw new Invalid("the receipt's leaf_hash is not the leaf hash of its record bytes");
      }
      if (!(await ed25519(key, signature, data))) {
        throw new Invalid("the record's signature does not verify with the public key");
      }
      let signed;
      try {
        signed = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(data));
      } catch (e) {
        throw new Invalid("the receipt's record bytes are not a JSON object");
      }
      if (signed === null || typeof signed !== "object" || signed.seq !== seq) {
        throw new Invalid(`the signed record is not record ${seq}`);
      }
      recordChecked = true;
    }
    const root = await rootFromInclusionProof(seq - 1, treeSize, leaf, proof);
    if (!equal(root, checkpoint.root)) {
      throw new Invalid(`the inclusion proof for leaf ${seq - 1} does not lead to the signed ` +
        `root of the tree of ${treeSize} leaves`);
    }
    return { seq, treeSize, origin: checkpoint.origin, root: toBase64(root), recordChecked };
  }

  button.addEventListener("click", async () => {
    show("checking", "checking…");
    if (!window.crypto || !crypto.subtle) {
      show("unsupported", "This browser has no WebCrypto here (it needs a secure context " +
        "such as http://127.0.0.1): verify with `callward audit verify-receipt` instead.");
      return;
    }
    try {
      const result = await verifyReceipt(document.getElementById("receipt").value,
        document.getElementById("public-key").value);
      show("valid", `VALID: record ${result.seq} is in log ${result.origin} under the ` +
        `checkpoint of ${result.treeSize} records signed by this key` +
        (result.recordChecked ? "; the record bytes and their signature verify too." : "."));
    } catch (e) {
      if (e instanceof Unsupported) {
        show("unsupported", "This browser's WebCrypto has no Ed25519, so the signatures " +
          "cannot be checked here: verify with `callward audit verify-receipt` instead.");
      } else if (e instanceof Invalid) {
        show("invalid", "INVALID: " + e.message);
      } else {
        show("invalid", "INVALID: " + e);
      }
    }
  });
})();
