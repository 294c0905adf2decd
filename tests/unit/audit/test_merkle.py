"""
The RFC 9162 Merkle tree: hashes, proofs and their verification, against public vectors.

The vectors are copied as data from transparency-dev/merkle (Apache-2.0):
``testonly/constants.go`` (leaves, node and root hashes of the RFC 6962 test tree) and
``proof/verify_test.go`` (inclusion and consistency proofs, and the ways of
corrupting them that must be rejected).
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callward.audit._merkle import (
    EMPTY_ROOT,
    Frontier,
    Subtree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_leaf_hashes,
    subtree_from_perfect,
    verify_consistency,
    verify_inclusion,
)
from callward.core import VerificationFailed

LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
)]
ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
LEAF_HASHES = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
    "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
    "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
    "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
)]


def _h(text: str) -> bytes:
    return bytes.fromhex(text)


# (leaf number counted from 1, tree size, proof), from proof/verify_test.go.
INCLUSION = [
    (1, 8, [_h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            _h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            _h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (6, 8, [_h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            _h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            _h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (3, 3, [_h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (2, 5, [_h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            _h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            _h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
]
CONSISTENCY = [
    (1, 8, [_h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            _h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            _h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]),
    (6, 8, [_h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            _h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            _h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
    (2, 5, [_h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            _h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b")]),
    (6, 7, [_h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            _h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            _h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7")]),
]
SOME_HASH = _h("abacaba000000000000000000000000000000000000000000060061e00123456")


def _subtree_over(hashes: list[bytes]) -> Subtree:
    def perfect(level: int, index: int) -> bytes:
        return root_from_leaf_hashes(hashes[index << level : (index + 1) << level])

    return subtree_from_perfect(perfect)


def _flip(proof: list[bytes], i: int, bit: int) -> list[bytes]:
    wrong = list(proof)
    wrong[i] = bytes([wrong[i][0] ^ bit]) + wrong[i][1:]
    return wrong


class TestTreeHashes:
    def test_leaf_hashes_match_the_vectors(self) -> None:
        """Each test leaf hashes to SHA-256(0x00 || leaf), as the RFC 6962 vectors say."""
        assert LEAF_HASHES == [leaf_hash(leaf) for leaf in LEAVES]

    def test_roots_match_the_vectors_for_every_size(self) -> None:
        """The root of the first n test leaves is the vector's, for n = 0..8."""
        assert ROOTS == [root_from_leaf_hashes(LEAF_HASHES[:n]) for n in range(9)]

    def test_empty_tree_root_is_sha256_of_nothing(self) -> None:
        """The empty tree's head is SHA-256 of the empty string (RFC 9162 §2.1.1)."""
        assert hashlib.sha256(b"").digest() == EMPTY_ROOT

    def test_frontier_root_matches_the_vectors(self) -> None:
        """A frontier fed the leaves one by one has the vector root at every size."""
        frontier = Frontier()
        roots = [frontier.root()]
        for h in LEAF_HASHES:
            frontier.append(h)
            roots.append(frontier.root())

        assert ROOTS == roots

    @given(st.integers(min_value=0, max_value=70))
    def test_frontier_agrees_with_the_recursive_definition(self, n: int) -> None:
        """For any size the incremental root equals the RFC's recursive MTH."""
        hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
        frontier = Frontier()
        for h in hashes:
            frontier.append(h)

        assert root_from_leaf_hashes(hashes) == frontier.root()


class TestInclusionProofs:
    @pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
    def test_generated_proofs_match_the_vectors(
        self, leaf: int, size: int, proof: list[bytes]
    ) -> None:
        """The audit path built from stored subtrees is the vector's."""
        assert tuple(proof) == inclusion_proof(leaf - 1, size, _subtree_over(LEAF_HASHES))

    @pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
    def test_vector_proofs_verify(self, leaf: int, size: int, proof: list[bytes]) -> None:
        """Each published proof leads from its leaf to the published root."""
        verify_inclusion(leaf - 1, size, LEAF_HASHES[leaf - 1], proof, ROOTS[size])

    @pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
    def test_corrupted_proofs_are_rejected(
        self, leaf: int, size: int, proof: list[bytes]
    ) -> None:
        """Every corruption from verify_test.go's corruptInclusionProof is rejected."""
        index, root, lh = leaf - 1, ROOTS[size], LEAF_HASHES[leaf - 1]
        probes = [
            (index - 1, size, root, lh, proof),
            (index + 1, size, root, lh, proof),
            (index ^ 2, size, root, lh, proof),
            (index, size * 2, root, lh, proof),
            (index, size // 2, root, lh, proof),
            (index, size, root, b"WrongLeaf", proof),
            (index, size, EMPTY_ROOT, lh, proof),
            (index, size, SOME_HASH, lh, proof),
            (index, size, root, lh, [*proof, b""]),
            (index, size, root, lh, [*proof, root]),
            (index, size, root, lh, [b"", *proof]),
            (index, size, root, lh, [root, *proof]),
            *((index, size, root, lh, _flip(proof, i, 8)) for i in range(len(proof))),
            (index, size, root, lh, proof[:-1]),
        ]
        if len(proof) > 1:
            probes.append((index, size, root, lh, [proof[0], SOME_HASH, *proof[1:]]))
        accepted = []
        for probe in probes:
            try:
                verify_inclusion(*probe)
            except VerificationFailed:
                continue
            accepted.append(probe)

        assert [] == accepted

    def test_single_leaf_tree_has_an_empty_proof(self) -> None:
        """In a tree of one leaf the leaf hash is the root and the proof is empty."""
        lh = leaf_hash(b"data")

        verify_inclusion(0, 1, lh, [], lh)
        with pytest.raises(VerificationFailed):
            verify_inclusion(0, 1, b"", [], lh)

    @pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (2, 1)])
    def test_index_outside_the_tree_is_rejected(self, index: int, size: int) -> None:
        """A leaf index at or past the tree size never verifies."""
        with pytest.raises(VerificationFailed, match="outside a tree"):
            verify_inclusion(index, size, SOME_HASH, [], EMPTY_ROOT)

    @given(st.integers(min_value=1, max_value=40), st.data())
    def test_every_leaf_of_any_tree_proves(self, size: int, data: st.DataObject) -> None:
        """For any size and leaf, the generated proof verifies against the root."""
        hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(size)]
        index = data.draw(st.integers(min_value=0, max_value=size - 1))
        proof = inclusion_proof(index, size, _subtree_over(hashes))

        verify_inclusion(index, size, hashes[index], proof, root_from_leaf_hashes(hashes))


class TestConsistencyProofs:
    @pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
    def test_generated_proofs_match_the_vectors(
        self, old: int, new: int, proof: list[bytes]
    ) -> None:
        """The consistency proof built from stored subtrees is the vector's."""
        assert tuple(proof) == consistency_proof(old, new, _subtree_over(LEAF_HASHES))

    @pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
    def test_vector_proofs_verify(self, old: int, new: int, proof: list[bytes]) -> None:
        """Each published consistency proof verifies between the published roots."""
        verify_consistency(old, new, ROOTS[old], ROOTS[new], proof)

    @pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
    def test_corrupted_proofs_are_rejected(self, old: int, new: int, proof: list[bytes]) -> None:
        """Every corruption from verify_test.go's corruptConsistencyProof is rejected."""
        r1, r2 = ROOTS[old], ROOTS[new]
        probes = [
            (old - 1, new, r1, r2, proof),
            (old + 1, new, r1, r2, proof),
            (old ^ 2, new, r1, r2, proof),
            (old, new * 2, r1, r2, proof),
            (old, new // 2, r1, r2, proof),
            (old, new, b"WrongRoot", r2, proof),
            (old, new, r1, b"WrongRoot", proof),
            (old, new, r2, r1, proof),
            (old, new, r1, r2, []),
            (old, new, r1, r2, [*proof, b""]),
            (old, new, r1, r2, [*proof, r1]),
            (old, new, r1, r2, [*proof, r2]),
            (old, new, r1, r2, [b"", *proof]),
            (old, new, r1, r2, [r1, *proof]),
            (old, new, r1, r2, [r2, *proof]),
            (old, new, r1, r2, [proof[0], *proof]),
            (old, new, r1, r2, proof[:-1]),
            *((old, new, r1, r2, _flip(proof, i, 16)) for i in range(len(proof))),
        ]
        accepted = []
        for probe in probes:
            try:
                verify_consistency(*probe)
            except VerificationFailed:
                continue
            accepted.append(probe)

        assert [] == accepted

    @pytest.mark.parametrize(
        ("old", "new", "root1", "root2", "proof"),
        [
            (0, 0, EMPTY_ROOT, SOME_HASH, []),
            (1, 1, EMPTY_ROOT, SOME_HASH, []),
            (1, 0, EMPTY_ROOT, EMPTY_ROOT, []),
            (2, 1, EMPTY_ROOT, EMPTY_ROOT, []),
            (1, 2, EMPTY_ROOT, SOME_HASH, []),
            (0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT]),
            (0, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT]),
            (1, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT]),
        ],
    )
    def test_edge_cases_from_the_vectors_are_rejected(
        self, old: int, new: int, root1: bytes, root2: bytes, proof: list[bytes]
    ) -> None:
        """Shrinking, differing roots at one size and non-empty trivial proofs fail."""
        with pytest.raises(VerificationFailed):
            verify_consistency(old, new, root1, root2, proof)

    def test_the_log_shrinking_is_named(self) -> None:
        """A newer checkpoint smaller than an older one is reported as the log shrinking."""
        with pytest.raises(VerificationFailed, match="the log shrank"):
            verify_consistency(5, 3, ROOTS[5], ROOTS[3], [])

    @given(st.integers(min_value=1, max_value=40), st.data())
    def test_any_prefix_proves_consistent(self, new: int, data: st.DataObject) -> None:
        """For any two sizes, the generated proof verifies between the two roots."""
        hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(new)]
        old = data.draw(st.integers(min_value=0, max_value=new))
        proof = consistency_proof(old, new, _subtree_over(hashes))

        verify_consistency(
            old, new, root_from_leaf_hashes(hashes[:old]), root_from_leaf_hashes(hashes), proof
        )
