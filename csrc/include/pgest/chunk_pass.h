// chunk_pass: the CPU row pass of sample / log_prob in its three parts, for a
// row whose columns are split over the ranks of a process group
// (pgest/distributed/vocab_parallel.py). Each rank passes its whole chunks of
// kChunk columns from the running max entering them (the max of every column
// before them); every rank finishes the row from all chunks' statistics; the
// owner of the chunk a draw falls in walks it. These are the operations one
// process's pass over the whole row performs, in its order: the same bits.
#pragma once

#include "status.h"

namespace pgest {

enum ChunkPassMode : int32_t {
  kChunkStats = 0,   // logits (rows, cols), entering (rows,) -> table (rows, chunks, 3)
  kChunkFinish = 1,  // table (rows, chunks, 3) -> row_max, log_z, entropy (rows,), weights (rows, chunks), cum
  kChunkWalk = 2,    // one chunk a row: logits (rows, cols <= 256), thresholds -> actions
};

// Row-major, unit column stride. Float arrays are in the accumulation type
// (float64 for float64 logits, float32 otherwise) unless said.
struct ChunkPassArgs {
  int32_t mode = kChunkStats;
  const void* logits = nullptr;  // stats, walk: the rows' columns, dtype
  int32_t dtype = 0;
  int64_t rows = 0, cols = 0, row_stride = 0;
  const void* entering = nullptr;  // stats: (rows,) the running max entering the first chunk
  void* table = nullptr;           // stats: out, finish: in; (rows, chunks, 3) running max after, sum, entropy sum
  int64_t chunks = 0;              // finish: chunks per row
  void* row_max = nullptr;         // finish: out (rows,); walk: in
  void* log_z = nullptr;           // finish: out (rows,)
  void* entropy = nullptr;         // finish: out (rows,)
  void* weights = nullptr;         // finish: out (rows, chunks) each chunk's mass at the row max; walk: in (rows,)
  double* cum = nullptr;           // finish: out (rows, chunks + 1) float64 running totals; walk: in (rows,)
  const double* thresholds = nullptr;  // walk: (rows, num_samples) ascending, +inf past a row's own
  int64_t num_samples = 0;
  int64_t* actions = nullptr;  // walk: out (rows, num_samples) column in the chunk, -1 for +inf
  int32_t num_threads = 1;
};

namespace cpu {
Status chunk_pass(const ChunkPassArgs& args, ErrorInfo* err);
}  // namespace cpu

}  // namespace pgest
