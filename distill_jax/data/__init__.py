"""Data: records -> tokens with byte offsets -> packed fixed-length rows -> batches, on Grain.

    from distill_jax.data import DataConfig, SourceConfig, make_iterator
    config = DataConfig(sources=(SourceConfig("data/*.jsonl"),), record="chat", seq_len=2048, batch_size=32)
    it = make_iterator(config, tokenizer, process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it); state = it.get_state()   # save `state` with the checkpoint; it.set_state(state) resumes

Batch contract. Every batch is a dict of numpy arrays of shape ``(B, L)`` with
``B = batch_size // process_count`` and ``L = seq_len``. Each row holds one or more *segments*
(a whole document, or one piece of a document longer than a row), packed first-fit, then
padding:

==================  =======  =================================================================
field               dtype    meaning
==================  =======  =================================================================
``tokens``          int32    input token ids; 0 on padding
``targets``         int32    the next token of the same document (also across a split piece's
                             end, where the document continues in another row); 0 where there
                             is none (the document's last token, padding)
``positions``       int32    0, 1, 2, ... restarting at every segment (so also at each piece of
                             a split document); 0 on padding
``segment_ids``     int32    1, 2, 3, ... per segment in the row; 0 on padding. Attention must
                             stay within a segment
``loss_mask``       float32  1 where ``targets`` is a real next token of the same document and
                             that token is trained on (response/assistant tokens unless
                             ``loss_on_prompt``); 0 elsewhere, always 0 on padding
``doc_ids``         int32    the document's global index (``Record.doc_id``: its position in
                             the concatenation of all sources); -1 on padding
``doc_offsets``     int32    the token's index within its document's token sequence; with
                             ``doc_ids`` this joins a per-document teacher cache
``byte_starts``     int32    the token's byte span ``[start, end)`` in the document's UTF-8 text
``byte_ends``       int32    (zero-width for added BOS/EOS)
==================  =======  =================================================================

Cross-tokenizer runs (``make_dataset(..., teacher_tokenizer=...)``) add the same nine fields
prefixed ``teacher_`` with shape ``(B, teacher_seq_len)``: row ``r``'s segment ``s`` in the
teacher arrays is the teacher's tokenization of exactly the bytes of segment ``s`` of student row
``r`` (same ``doc_ids``; pieces of split documents are cut where both tokenizations have a
boundary). :func:`row_segments` lists a row's segments with their byte ranges.

They also carry the chunk alignment of the two tokenizations (:mod:`distill_jax.xtok.align`,
mode ``DataConfig.alignment``), as row-local chunk ids of each position's *target*:

=====================  =====  ====================  ============================================
field                  dtype  shape                 meaning
=====================  =====  ====================  ============================================
``chunk_ids``          int32  (B, seq_len)          the chunk of ``targets`` at this position;
                                                    -1 where unaligned (skipped special tokens,
                                                    chunks mixing special and ordinary tokens,
                                                    an unaligned head or tail), where the target
                                                    is not a real token, on padding, and for
                                                    chunks not wholly inside this row's piece on
                                                    both sides
``teacher_chunk_ids``  int32  (B, teacher_seq_len)  the same for ``teacher_targets``
=====================  =====  ====================  ============================================

Chunk ``c`` of row ``r`` is the student targets with ``chunk_ids[r] == c`` and the teacher
targets with ``teacher_chunk_ids[r] == c``: both spell exactly the same bytes of the same
document. Ids in a row are ``0, 1, 2, ...`` in text order, except that a gap of at least one
unused id separates chunks that are not adjacent in the text (something between them was
skipped, or they are in different segments): chunk ``c + 1`` directly follows chunk ``c``
exactly when id ``c + 1`` is present. Same-tokenizer batches have neither field.

Pair records (``record: pairs``, REDI) give other rows: whole (prompt + chosen, prompt +
rejected) pairs with a per-token ``sequence_weight`` (:mod:`distill_jax.data.pairs`).

Shuffling, mixing, sharding and resumption: see :mod:`distill_jax.data.records` and
:mod:`distill_jax.data.pipeline`. The iterator's ``bad_record_count`` (and ``stats``) counts
skipped bad records for training metrics.
"""

from distill_jax.data.check import CheckReport, check_records, scan_records
from distill_jax.data.config import DataConfig, SourceConfig
from distill_jax.data.packing import (ALIGNMENT_FIELDS, STUDENT_FIELDS, TEACHER_FIELDS, Segment, cut_point,
                                      row_segments)
from distill_jax.data.pipeline import (DocumentPlan, PackedDataset, PackedIterator, make_dataset,
                                       make_iterator)
from distill_jax.data.pairs import PairIterator, TokenizedPair, make_pair_iterator, pack_pairs, tokenize_pair
from distill_jax.data.shards import (ShardedIterator, concatenate_rows, make_process_iterator,
                                     process_shards)
from distill_jax.data.records import BadRecordError, Record, Records, read_records
from distill_jax.data.tokenize import (TokenizedDoc, TokenizerInfo, Tokens, tokenize_record,
                                       tokenize_records, tokenizer_info)

__all__ = [
    "ALIGNMENT_FIELDS",
    "BadRecordError",
    "CheckReport",
    "DataConfig",
    "DocumentPlan",
    "PackedDataset",
    "PackedIterator",
    "PairIterator",
    "Record",
    "Records",
    "STUDENT_FIELDS",
    "Segment",
    "ShardedIterator",
    "SourceConfig",
    "TEACHER_FIELDS",
    "TokenizedDoc",
    "TokenizedPair",
    "TokenizerInfo",
    "Tokens",
    "check_records",
    "concatenate_rows",
    "cut_point",
    "make_dataset",
    "make_iterator",
    "make_pair_iterator",
    "make_process_iterator",
    "pack_pairs",
    "process_shards",
    "read_records",
    "row_segments",
    "scan_records",
    "tokenize_record",
    "tokenize_pair",
    "tokenize_records",
    "tokenizer_info",
]
