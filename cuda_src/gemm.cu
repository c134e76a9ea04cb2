// NVFP4 block-scaled grouped GEMM (list of groups, ragged MoE, fused dual GEMM) on mma.sync, sm_80+.
//
// Every problem computes C[m, n] = alpha * sum_k A[m, k] * B[n, k] (dual: silu(alpha * A B1^T) *
// (alpha2 * A B2^T)), with
//   B  [N, K/2] uint8   packed e2m1 weights, K-major, + sfb [N, K/16] e4m3 (plain or blocked layout)
//   A  [M, K/2] uint8   packed e2m1 tokens + sfa (W4A4), or [M, K] fp16 / bf16 tokens (W4A16)
//   C  [M, N]           fp16, bf16 or fp32, row stride c_row elements
// Tensor cores have no FP4 on Hopper: both operands are dequantized inside the kernel to exact fp16
// (bf16 when the tokens are bf16) and fed to mma.sync m16n8k16 with fp32 accumulation.
//
// Swapped product (Machete's trick): the kernel computes C^T = B A^T, so the weight rows N are the
// MMA's M dimension (16 rows per MMA) and the few tokens are its N dimension (8 per MMA). A CTA owns
// a tile of kBlockN = 128 weight rows x kBlockM tokens; four warps split the weight rows (32 each)
// and kWarpsM warps split the tokens.
//
// K order inside one stage of kStageK = 64 values (the GEMM sums over k, so any permutation applied
// to both operands alike gives the same result): thread t of a quad (t = lane % 4) owns the 16
// values 16t .. 16t+15 of each row it touches, exactly one e4m3 scale block, and feeds k step j
// (j = 0..3) with values 16t + 4j + {0, 1} (the MMA's k = 2t, 2t+1) and 16t + 4j + {2, 3} (its k =
// 2t+8, 2t+9). Both operands follow the same rule, so the weights need one 8-byte shared load per
// row per stage and the tokens one 16-byte load per 8 values, with no ldmatrix.
//
// Pipeline: kStages shared-memory stages filled by cp.async (weights, scales and tokens as they lie
// in global memory), one barrier per stage. A pipeline stage holds kSub sub-stages of kStageK values
// (each laid out as a whole stage of kSub = 1), so that every weight row is read kSub * 32 contiguous
// bytes at a time: on the H100 a read of 128-row tiles reached 2.1 TB/s at 32 bytes per row and step,
// 2.5 at 64 and the copy bandwidth (2.95) at 128 (session 12), which caps the memory-bound calls (MoE
// decode) below the copy bandwidth at kSub = 1. W4A4 tokens are dequantized once per CTA and stage
// into an fp16 buffer (a second barrier), so the inner loop is the same for W4A4 and W4A16; tiles with
// sub-stages (16 tokens) get their W4A4 tokens dequantized before the kernel (dequant_tokens_kernel).
// Tiles past the edges (n >= N, m >= M) load the last valid row instead (always in bounds; their
// results are never stored).
//
// group_gemm_wgmma_kernel (end of this file) is the Hopper (sm_90a) variant of the same GEMM: same
// problem table, scheduler, pipeline and epilogue rules, with wgmma.mma_async in place of mma.sync.
#include "common/dequant.cuh"
#include "common/fp4.cuh"
#include "common/last_arrival.cuh"
#include "common/mbarrier.cuh"
#include "common/mma.cuh"
#include "common/tile_scheduler.cuh"
#include "common/types.cuh"
#include "common/wgmma.cuh"

namespace cuflash {

// Kinds of the token operand A.
constexpr int kTokensNVFP4 = 0;  // packed e2m1 + e4m3 scales (W4A4)
constexpr int kTokensF16 = 1;    // fp16 activations (W4A16)
constexpr int kTokensBF16 = 2;   // bf16 activations (W4A16)

// Output element types (runtime argument: the epilogue is the only place they differ).
constexpr int kOutF16 = 0;
constexpr int kOutBF16 = 1;
constexpr int kOutF32 = 2;

constexpr int kStageK = 64;                             // K values per pipeline stage
constexpr int kStagePackedBytes = kStageK / 2;          // 32 bytes of e2m1 codes per row and stage
constexpr int kStageScales = kStageK / kScaleBlock;     // 4 scale bytes per row and stage
constexpr int kWarpsN = 4;                              // warps along the weight rows
constexpr int kWarpRowsN = 32;                          // weight rows per warp: two m16 MMA tiles
constexpr int kMmaTilesN = kWarpRowsN / 16;
constexpr int kBlockN = kWarpsN * kWarpRowsN;           // 128 weight rows per CTA
// fp16/bf16 token rows in shared memory: 64 values + 8 of padding = 144 bytes, so that the 16-byte
// fragment loads of 8 lanes (2 rows x 4 quads) hit 8 distinct 4-bank groups.
constexpr int kTokenPitch = (kStageK + 8) * 2;
// Blocked scale layout (cuBLAS): 512-byte atoms of 128 rows x 4 scale columns.
constexpr int kAtomRows = 128;
constexpr int kAtomBytes = 512;

// Address of the 4 scale bytes of `row` for stage kt (scale columns 4kt .. 4kt+3): contiguous and
// 4-byte aligned in both layouts (K % 64 == 0, so a plain row holds K/16 = 4 * num_stages bytes and
// a blocked atom row holds exactly one stage).
__device__ __forceinline__ const unsigned char* scale_ptr(long long base, int row, int kt, long long row_bytes,
                                                          bool blocked, int num_k_stages) {
  if (blocked) {
    // byte ((r / 128) * ceil(Kb / 4) + c / 4) * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + c % 4,
    // with ceil(Kb / 4) = K / 64 = num_k_stages and c = 4 kt
    const long long atom = static_cast<long long>(row / kAtomRows) * num_k_stages + kt;
    return reinterpret_cast<const unsigned char*>(base) + atom * kAtomBytes + (row % 32) * 16 +
           ((row % kAtomRows) / 32) * 4;
  }
  return reinterpret_cast<const unsigned char*>(base) + row * row_bytes + kt * kStageScales;
}

// MMA operand type: bf16 when the tokens are bf16, else fp16 (W4A4 values are exact in fp16).
template <int kTokens> struct MmaType { using type = __half; };
template <> struct MmaType<kTokensBF16> { using type = __nv_bfloat16; };

template <int kBlockM, int kWarpsM, int kStages, int kTokens, bool kDual, int kSub_>
struct GemmTraits {
  using MmaT = typename MmaType<kTokens>::type;
  static constexpr int kSub = kSub_;  // sub-stages of kStageK values per pipeline stage
  static constexpr int kThreads = 32 * kWarpsN * kWarpsM;
  static constexpr int kWarpTokens = kBlockM / kWarpsM;   // tokens per warp
  static constexpr int kMmaTilesM = kWarpTokens / 8;      // n8 MMA tiles per warp
  static constexpr int kWeights = kDual ? 2 : 1;          // weight operands (B, or B1 and B2)
  // Shared memory of one sub-stage, every part a multiple of 16 bytes.
  static constexpr int kWeightBytes = kBlockN * kStagePackedBytes;
  static constexpr int kWeightScaleBytes = kBlockN * kStageScales;
  static constexpr int kTokenBytes =
      kTokens == kTokensNVFP4 ? kBlockM * kStagePackedBytes : kBlockM * kTokenPitch;
  static constexpr int kTokenScaleBytes = kTokens == kTokensNVFP4 ? kBlockM * kStageScales : 0;
  static constexpr int kBlockRows = kBlockN;  // weight rows per CTA tile
  static constexpr int kWeightOffset = 0;      // stage layout: weights (and scales) first, then tokens
  static constexpr int kTokenOffset = kWeights * (kWeightBytes + kWeightScaleBytes);
  static constexpr int kStageBytes =
      kWeights * (kWeightBytes + kWeightScaleBytes) + kTokenBytes + kTokenScaleBytes;
  static constexpr int kSlotBytes = kSub * kStageBytes;  // one pipeline stage
  // W4A4: one fp16 buffer of dequantized tokens for the current stage.
  static constexpr int kTokenF16Bytes = kTokens == kTokensNVFP4 ? kBlockM * kTokenPitch : 0;
  static constexpr int kPipeBytes = kStages * kSlotBytes + kTokenF16Bytes;
  static_assert(kTokens != kTokensNVFP4 || kSub == 1, "W4A4 tokens reach sub-stage tiles dequantized");
  static_assert(kBlockM % (8 * kWarpsM) == 0, "each warp needs whole n8 MMA tiles");
  static_assert(kStageBytes % 16 == 0, "stage buffers must stay 16-byte aligned");
  // Byte offset of 16-byte chunk c (values 8c .. 8c+7) of fp16 token row r: padded rows.
  __device__ __forceinline__ static int token_chunk_offset(int r, int c) { return r * kTokenPitch + c * 16; }
};

// One tile's view of its problem.
struct TileView {
  const GemmProblem* problem;  // alpha, alpha2 and C for the epilogue
  const unsigned char* a;   // token matrix (row 0 of its L slice)
  const unsigned char* b[2];
  long long sfa, sfb[2];
  long long a_row, b_row, sfa_row, sfb_row;
  int rows;                 // valid token rows of the problem (M)
  int row_base;             // first token row of the problem in its matrix (ragged)
  int n;                    // weight rows (N)
  int num_k_stages;
  int m0, n0;               // first token / weight row of the tile
  bool blocked;
};

// The view of tile `tile` of the persistent walk: its problem found through the tile prefix
// (built by build_tile_prefix), its place in the problem (token tiles fastest).
template <bool kDual, int kBlockRows>
__device__ __forceinline__ TileView make_tile_view(const GemmProblem* __restrict__ problems, int num_problems,
                                                   const int* __restrict__ offsets, const int* prefix, int tile,
                                                   int block_m, bool blocked) {
  const int pi = find_problem(prefix, num_problems, tile);
  const GemmProblem& p = problems[pi];
  const ProblemRows rows = problem_rows(p, offsets);
  const int local = tile - prefix[pi];
  const int m_tiles = ceil_div_dev(rows.rows, block_m);
  TileView v;
  v.problem = &p;
  v.a = reinterpret_cast<const unsigned char*>(p.a);
  v.b[0] = reinterpret_cast<const unsigned char*>(p.b);
  v.b[1] = reinterpret_cast<const unsigned char*>(kDual ? p.b2 : p.b);
  v.sfa = p.sfa;
  v.sfb[0] = p.sfb;
  v.sfb[1] = kDual ? p.sfb2 : p.sfb;
  v.a_row = p.a_row;
  v.b_row = p.b_row;
  v.sfa_row = p.sfa_row;
  v.sfb_row = p.sfb_row;
  v.rows = rows.rows;
  v.row_base = rows.row_base;
  v.n = p.n;
  v.num_k_stages = p.k / kStageK;
  v.m0 = (local % m_tiles) * block_m;
  v.n0 = (local / m_tiles) * kBlockRows;
  v.blocked = blocked;
  return v;
}

template <class Tr, int kTokens, bool kDual>
struct Stage {
  unsigned char* base;
  __device__ __forceinline__ unsigned char* weights(int w) const {
    return base + Tr::kWeightOffset + w * (Tr::kWeightBytes + Tr::kWeightScaleBytes);
  }
  __device__ __forceinline__ unsigned char* weight_scales(int w) const { return weights(w) + Tr::kWeightBytes; }
  __device__ __forceinline__ unsigned char* tokens() const { return base + Tr::kTokenOffset; }
  __device__ __forceinline__ unsigned char* token_scales() const { return tokens() + Tr::kTokenBytes; }
};

// The cp.async copies one thread issues for every stage of a tile. Copy j of a thread is item
// threadIdx.x + j * kThreads of its operand; its global source is computed once per tile (rows past
// the edge clamped to the last valid row: always in bounds, results never stored) and moves by a
// fixed stride per stage, so a stage costs one address add and one copy per item. Threads split
// every operand evenly (kThreads is a multiple of the 16-byte chunks per row), so item rows advance
// by a constant and each copy's shared-memory offset is a compile-time step from the first.
template <class Tr, int kTokens, bool kDual, int kBlockM>
struct TileLoader {
  static constexpr int kT = Tr::kThreads;
  static constexpr int kRows = Tr::kBlockRows;
  static constexpr int kWeightItems = kRows * 2;  // 16-byte chunks of weights per operand and stage
  static constexpr int kTokenChunks = kTokens == kTokensNVFP4 ? 2 : kStageK * 2 / 16;  // per token row
  static constexpr int kTokenItems = kBlockM * kTokenChunks;
  static constexpr int kW = (kWeightItems + kT - 1) / kT;
  static constexpr int kWs = (kRows + kT - 1) / kT;
  static constexpr int kTok = (kTokenItems + kT - 1) / kT;
  static constexpr int kTs = kTokens == kTokensNVFP4 ? (kBlockM + kT - 1) / kT : 0;
  static_assert(kT % kTokenChunks == 0 && kT % 2 == 0, "each thread keeps one chunk column");
  static constexpr int kTokenBytesPerStage = kTokens == kTokensNVFP4 ? kStagePackedBytes : kStageK * 2;

  // Token item i: chunk i % kTokenChunks of row i / kTokenChunks, so that the 8 or 2 chunks of a row
  // come from consecutive threads (whole 32-byte sectors of global memory per 16-byte copy pair).
  __device__ __forceinline__ static int token_row(int i) { return i / kTokenChunks; }
  __device__ __forceinline__ static int token_chunk(int i) { return i % kTokenChunks; }
  static_assert(kTokens == kTokensNVFP4 || kBlockM % 8 == 0, "token rows in groups of 8");

  const unsigned char* w[Tr::kWeights][kW];
  const unsigned char* ws[Tr::kWeights][kWs];
  const unsigned char* tok[kTok];
  const unsigned char* ts[kTs > 0 ? kTs : 1];
  int scale_step;  // bytes between the scale words of consecutive stages: 4 plain, 512 blocked

  __device__ __forceinline__ explicit TileLoader(const TileView& v) {
    const int tid = threadIdx.x;
    scale_step = v.blocked ? kAtomBytes : kStageScales;
#pragma unroll
    for (int o = 0; o < Tr::kWeights; ++o) {
#pragma unroll
      for (int j = 0; j < kW; ++j) {
        const int i = tid + j * kT, r = i >> 1;
        w[o][j] = v.b[o] + min(v.n0 + r, v.n - 1) * v.b_row + (i & 1) * 16;
      }
#pragma unroll
      for (int j = 0; j < kWs; ++j)
        ws[o][j] = scale_ptr(v.sfb[o], min(v.n0 + tid + j * kT, v.n - 1), 0, v.sfb_row, v.blocked, v.num_k_stages);
    }
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      const int i = tid + j * kT, r = token_row(i);
      tok[j] = v.a + (v.row_base + min(v.m0 + r, v.rows - 1)) * v.a_row + token_chunk(i) * 16;
    }
#pragma unroll
    for (int j = 0; j < kTs; ++j)
      ts[j] = scale_ptr(v.sfa, v.row_base + min(v.m0 + tid + j * kT, v.rows - 1), 0, v.sfa_row, v.blocked,
                        v.num_k_stages);
  }

  // Stage kt's copies into its ring buffer (kt % kStages) of the pipeline at `smem`, if the tile has it.
  template <int kStages>
  __device__ __forceinline__ void load_if(unsigned char* smem, int kt, int kts) const {
    if (kt < kts) load(Stage<Tr, kTokens, kDual>{smem + (kt % kStages) * Tr::kStageBytes}, kt);
  }

  // Issue stage kt's copies into `st`.
  __device__ __forceinline__ void load(const Stage<Tr, kTokens, kDual>& st, int kt) const {
    const int tid = threadIdx.x;
    const long long sc = static_cast<long long>(kt) * scale_step;
#pragma unroll
    for (int o = 0; o < Tr::kWeights; ++o) {
#pragma unroll
      for (int j = 0; j < kW; ++j)
        if (kWeightItems % kT == 0 || tid + j * kT < kWeightItems)
          cp_async_16(st.weights(o) + (tid + j * kT) * 16, w[o][j] + kt * kStagePackedBytes);
#pragma unroll
      for (int j = 0; j < kWs; ++j)
        if (kRows % kT == 0 || tid + j * kT < kRows)
          cp_async_4(st.weight_scales(o) + (tid + j * kT) * kStageScales, ws[o][j] + sc);
    }
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      const int i = tid + j * kT;
      if (kTokenItems % kT == 0 || i < kTokenItems) {
        unsigned char* dst = kTokens == kTokensNVFP4 ? st.tokens() + i * 16
                                                     : st.tokens() + Tr::token_chunk_offset(token_row(i), token_chunk(i));
        cp_async_16(dst, tok[j] + kt * kTokenBytesPerStage);
      }
    }
#pragma unroll
    for (int j = 0; j < kTs; ++j)
      if (kBlockM % kT == 0 || tid + j * kT < kBlockM)
        cp_async_4(st.token_scales() + (tid + j * kT) * kStageScales, ts[j] + sc);
  }
};

// TileLoader for pipeline stages of Tr::kSub > 1 sub-stages (the portable kernel's 16-token tiles), same
// interface. An item is one 16-byte piece of a row (4 bytes for scales); the pieces of one row and
// stage, all its sub-stages in K order, are consecutive items, so consecutive threads read contiguous
// global memory (kSub * 32 bytes of every weight row). As in TileLoader, each thread keeps one piece
// column (hence one sub-stage) and its sources move by a fixed stride per stage. Sub-stages past the
// tile's last stage (K / 64 not a multiple of kSub) are skipped. TileLoader is this loader's kSub = 1
// case written out: on the H100 (session 12) building the wgmma kernel's producer from this general
// form instead cost 1-2% on the GPU MODE cases (same-process A/B), and variants of its index
// arithmetic moved the MoE decode case by 5%, so each kernel keeps the form measured fastest.
template <class Tr, int kTokens, bool kDual, int kBlockM>
struct SubStageLoader {
  static constexpr int kT = Tr::kThreads;
  static constexpr int kSub = Tr::kSub;
  static constexpr int kRows = Tr::kBlockRows;
  static constexpr int kWeightPieces = 2 * kSub;  // 16-byte pieces per weight row and stage
  static constexpr int kWeightShift = kSub == 2 ? 2 : 3;  // log2(kWeightPieces)
  static constexpr int kWeightItems = kRows * kWeightPieces;
  static constexpr int kTokenChunks = kTokens == kTokensNVFP4 ? 2 : kStageK * 2 / 16;  // per token row and sub-stage
  static constexpr int kTokenPieces = kTokenChunks * kSub;
  static constexpr int kTokenItems = kBlockM * kTokenPieces;
  static constexpr int kW = (kWeightItems + kT - 1) / kT;
  static constexpr int kWs = (kRows * kSub + kT - 1) / kT;
  static constexpr int kTok = (kTokenItems + kT - 1) / kT;
  static constexpr int kTs = kTokens == kTokensNVFP4 ? (kBlockM * kSub + kT - 1) / kT : 0;
  static_assert(kSub == 2 || kSub == 4, "2 or 4 sub-stages per pipeline stage (1: TileLoader)");
  static_assert(kT % kTokenPieces == 0 && kT % kWeightPieces == 0 && kT % kSub == 0,
                "each thread keeps one piece column");
  static constexpr int kTokenBytesPerStage = kTokenChunks * 16;
  static_assert(kTokens == kTokensNVFP4 || kBlockM % 8 == 0, "token rows in groups of 8");

  const unsigned char* w[Tr::kWeights][kW];
  const unsigned char* ws[Tr::kWeights][kWs];
  const unsigned char* tok[kTok];
  const unsigned char* ts[kTs > 0 ? kTs : 1];
  int scale_step;  // bytes between the scale words of consecutive sub-stages: 4 plain, 512 blocked

  __device__ __forceinline__ explicit SubStageLoader(const TileView& v) {
    const int tid = threadIdx.x;
    scale_step = v.blocked ? kAtomBytes : kStageScales;
#pragma unroll
    for (int o = 0; o < Tr::kWeights; ++o) {
#pragma unroll
      for (int j = 0; j < kW; ++j) {
        const int i = tid + j * kT, r = i >> kWeightShift;
        w[o][j] = v.b[o] + min(v.n0 + r, v.n - 1) * v.b_row + (i & (kWeightPieces - 1)) * 16;
      }
#pragma unroll
      for (int j = 0; j < kWs; ++j) {
        const int i = tid + j * kT;
        ws[o][j] = scale_ptr(v.sfb[o], min(v.n0 + i / kSub, v.n - 1), i % kSub, v.sfb_row, v.blocked, v.num_k_stages);
      }
    }
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      const int i = tid + j * kT, r = i / kTokenPieces;
      tok[j] = v.a + (v.row_base + min(v.m0 + r, v.rows - 1)) * v.a_row + (i % kTokenPieces) * 16;
    }
#pragma unroll
    for (int j = 0; j < kTs; ++j) {
      const int i = tid + j * kT;
      ts[j] = scale_ptr(v.sfa, v.row_base + min(v.m0 + i / kSub, v.rows - 1), i % kSub, v.sfa_row, v.blocked,
                        v.num_k_stages);
    }
  }

  // Pipeline stage kt's copies into its ring buffer (kt % kStages) of the pipeline at `smem`, if the tile has it
  // (kts: the tile's sub-stages).
  template <int kStages>
  __device__ __forceinline__ void load_if(unsigned char* smem, int kt, int kts) const {
    if (kt * kSub < kts) load(smem + (kt % kStages) * Tr::kSlotBytes, kt, kts);
  }

  // Issue pipeline stage kt's copies into the buffer at `slot` (sub-stage s at slot + s * kStageBytes).
  // Shared-memory offsets of this thread's first piece of each operand: its sub-stage's buffer, row and piece.
  __device__ __forceinline__ void load(unsigned char* slot, int kt, int kts) const {
    using St = Stage<Tr, kTokens, kDual>;
    const int tid = threadIdx.x;
    const long long sc = static_cast<long long>(kt) * kSub * scale_step;
    const int w_sub = (tid & (kWeightPieces - 1)) >> 1, t_sub = (tid % kTokenPieces) / kTokenChunks, s_sub = tid % kSub;
    const int w_off = (tid >> kWeightShift) * kStagePackedBytes + (tid & 1) * 16;
    const int s_off = (tid / kSub) * kStageScales;
    auto has = [&](int sub) { return kt * kSub + sub < kts; };  // the tile has this sub-stage
#pragma unroll
    for (int o = 0; o < Tr::kWeights; ++o) {
      if (has(w_sub)) {
        unsigned char* dst = St{slot + w_sub * Tr::kStageBytes}.weights(o) + w_off;
#pragma unroll
        for (int j = 0; j < kW; ++j)
          if (kWeightItems % kT == 0 || tid + j * kT < kWeightItems)
            cp_async_16(dst + j * (kT / kWeightPieces) * kStagePackedBytes, w[o][j] + kt * kSub * kStagePackedBytes);
      }
      if (has(s_sub)) {
        unsigned char* dst = St{slot + s_sub * Tr::kStageBytes}.weight_scales(o) + s_off;
#pragma unroll
        for (int j = 0; j < kWs; ++j)
          if ((kRows * kSub) % kT == 0 || tid + j * kT < kRows * kSub)
            cp_async_4(dst + j * (kT / kSub) * kStageScales, ws[o][j] + sc);
      }
    }
    if (has(t_sub)) {
      const St st{slot + t_sub * Tr::kStageBytes};
#pragma unroll
      for (int j = 0; j < kTok; ++j) {
        const int i = tid + j * kT, r = i / kTokenPieces, c = i % kTokenChunks;
        if (kTokenItems % kT == 0 || i < kTokenItems) {
          unsigned char* dst = kTokens == kTokensNVFP4 ? st.tokens() + (r * kTokenChunks + c) * 16
                                                       : st.tokens() + Tr::token_chunk_offset(r, c);
          cp_async_16(dst, tok[j] + kt * kSub * kTokenBytesPerStage);
        }
      }
    }
    if (has(s_sub)) {
      unsigned char* dst = St{slot + s_sub * Tr::kStageBytes}.token_scales() + s_off;
#pragma unroll
      for (int j = 0; j < kTs; ++j)
        if ((kBlockM * kSub) % kT == 0 || tid + j * kT < kBlockM * kSub)
          cp_async_4(dst + j * (kT / kSub) * kStageScales, ts[j] + sc);
    }
  }
};

// The pipeline's first kStages - 1 stages (TileLoader or SubStageLoader), one cp.async group each (empty
// groups too, so that the group count, and hence every later wait, is the same for every thread and tile).
template <int kStages, class Loader>
__device__ __forceinline__ void load_prologue(const Loader& loader, unsigned char* smem, int kts) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    loader.template load_if<kStages>(smem, s, kts);
    cp_async_commit();
  }
}

// The portable kernel's loader: SubStageLoader with sub-stages, else TileLoader.
template <class Tr, int kTokens, bool kDual, int kBlockM, bool kSubStages>
struct LoaderOf { using type = TileLoader<Tr, kTokens, kDual, kBlockM>; };
template <class Tr, int kTokens, bool kDual, int kBlockM>
struct LoaderOf<Tr, kTokens, kDual, kBlockM, true> { using type = SubStageLoader<Tr, kTokens, kDual, kBlockM>; };

// W4A4: dequantize the stage's packed tokens into the fp16 buffer, natural K order, each 16-byte
// chunk where Tr::token_chunk_offset puts it.
template <class Tr, int kTokens, bool kDual, int kBlockM>
__device__ __forceinline__ void dequant_tokens(const Stage<Tr, kTokens, kDual>& st, unsigned char* dst) {
  for (int i = threadIdx.x; i < kBlockM * kStageScales; i += Tr::kThreads) {
    // one scale block of 16 values: 32 consecutive items read 8 rows x 4 blocks (256 contiguous
    // bytes), and each 8 of them write one chunk of 8 rows (distinct bank groups in both layouts)
    const int r = (i & 7) + 8 * (i / (8 * kStageScales)), blk = (i >> 3) % kStageScales;
    const uint2 packed = *reinterpret_cast<const uint2*>(st.tokens() + r * kStagePackedBytes + blk * 8);
    const __half2 factor = scale_factor(st.token_scales()[r * kStageScales + blk]);
    const Pairs4 lo = dequant_e2m1x8_f16(packed.x, factor);
    const Pairs4 hi = dequant_e2m1x8_f16(packed.y, factor);
    *reinterpret_cast<uint4*>(dst + Tr::token_chunk_offset(r, 2 * blk)) = as_uint4(lo);
    *reinterpret_cast<uint4*>(dst + Tr::token_chunk_offset(r, 2 * blk + 1)) = as_uint4(hi);
  }
}

// The MMAs of one stage for one warp. acc[w][mt][nt][4]: weight operand w, m16 tile mt (32 weight
// rows per warp), n8 tile nt (tokens).
template <class Tr, int kTokens, bool kDual>
__device__ __forceinline__ void compute_stage(const Stage<Tr, kTokens, kDual>& st, const unsigned char* tokens_f16,
                                              float (&acc)[Tr::kWeights][kMmaTilesN][Tr::kMmaTilesM][4],
                                              int warp_n, int warp_m) {
  using T = typename Tr::MmaT;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  // Raw codes and scale factors of this thread's 4 weight rows (per operand): row
  // warp_n*32 + mt*16 + h*8 + g, values 16t .. 16t+15 of the stage.
  uint2 raw[Tr::kWeights][kMmaTilesN][2];
  __half2 factor[Tr::kWeights][kMmaTilesN][2];
#pragma unroll
  for (int w = 0; w < Tr::kWeights; ++w)
#pragma unroll
    for (int mt = 0; mt < kMmaTilesN; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp_n * kWarpRowsN + mt * 16 + h * 8 + g;
        raw[w][mt][h] = *reinterpret_cast<const uint2*>(st.weights(w) + r * kStagePackedBytes + t * 8);
        factor[w][mt][h] = scale_factor(st.weight_scales(w)[r * kStageScales + t]);
      }
  // Two halves of the stage: half s holds k steps 2s and 2s+1 (values 16t + 8s .. 16t + 8s + 7).
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    Pairs4 a[Tr::kWeights][kMmaTilesN][2];
#pragma unroll
    for (int w = 0; w < Tr::kWeights; ++w)
#pragma unroll
      for (int mt = 0; mt < kMmaTilesN; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          a[w][mt][h] = dequant_e2m1x8<T>(s == 0 ? raw[w][mt][h].x : raw[w][mt][h].y, factor[w][mt][h]);
#pragma unroll
    for (int nt = 0; nt < Tr::kMmaTilesM; ++nt) {
      const int tok = warp_m * Tr::kWarpTokens + nt * 8 + g;
      // 8 token values 16t + 8s .. +7 as 4 pairs
      const uint4 b = *reinterpret_cast<const uint4*>(tokens_f16 + tok * kTokenPitch + (16 * t + 8 * s) * 2);
#pragma unroll
      for (int j = 0; j < 2; ++j) {  // k step 2s + j: values 16t + 8s + 4j + {0,1} and {2,3}
        const unsigned bf[2] = {j == 0 ? b.x : b.z, j == 0 ? b.y : b.w};
#pragma unroll
        for (int w = 0; w < Tr::kWeights; ++w)
#pragma unroll
          for (int mt = 0; mt < kMmaTilesN; ++mt) {
            const unsigned af[4] = {a[w][mt][0].p[2 * j], a[w][mt][1].p[2 * j], a[w][mt][0].p[2 * j + 1],
                                    a[w][mt][1].p[2 * j + 1]};
            mma_16816<T>(acc[w][mt][nt], af, bf);
          }
      }
    }
  }
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ void store_out(const GemmProblem& p, int out_dtype, long long row, int col, float v) {
  const long long i = row * p.c_row + col;
  if (out_dtype == kOutF16) reinterpret_cast<__half*>(p.c)[i] = __float2half_rn(v);
  else if (out_dtype == kOutBF16) reinterpret_cast<__nv_bfloat16*>(p.c)[i] = __float2bfloat16_rn(v);
  else reinterpret_cast<float*>(p.c)[i] = v;
}

// Persistent grouped GEMM. problems [num_problems] (GemmProblem); offsets [groups + 1] int32 for
// ragged problems (else unused); blocked_scales: 0 plain, 1 blocked; out_dtype: kOut*.
template <int kBlockM, int kWarpsM, int kStages, int kTokens, bool kDual, int kSub>
__global__ void __launch_bounds__(GemmTraits<kBlockM, kWarpsM, kStages, kTokens, kDual, kSub>::kThreads)
    group_gemm_kernel(const GemmProblem* __restrict__ problems, int num_problems, const int* __restrict__ offsets,
                      int blocked_scales, int out_dtype) {
  using Tr = GemmTraits<kBlockM, kWarpsM, kStages, kTokens, kDual, kSub>;
  using St = Stage<Tr, kTokens, kDual>;
  extern __shared__ __align__(128) unsigned char smem[];
  int* prefix = reinterpret_cast<int*>(smem + Tr::kPipeBytes);
  unsigned char* tokens_f16_buf = smem + kStages * Tr::kSlotBytes;  // W4A4 only

  build_tile_prefix<kBlockM, kBlockN>(problems, num_problems, offsets, prefix);
  const int total_tiles = prefix[num_problems];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_n = warp % kWarpsN, warp_m = warp / kWarpsN;
  // 16-token tiles of W4A4 run after dequant_tokens_kernel (programmatic launch): wait until it has finished
  // (GemmKernelConfig.dequant_first; other tiles keep their tokens' dequant in the main loop)
  if constexpr (kBlockM == 16) griddep_wait();

  for (int tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    const TileView v = make_tile_view<kDual, kBlockN>(problems, num_problems, offsets, prefix, tile, kBlockM, blocked_scales != 0);
    const GemmProblem& p = *v.problem;
    using Loader = typename LoaderOf<Tr, kTokens, kDual, kBlockM, (kSub > 1)>::type;
    const Loader loader(v);

    float acc[Tr::kWeights][kMmaTilesN][Tr::kMmaTilesM][4];
#pragma unroll
    for (int w = 0; w < Tr::kWeights; ++w)
#pragma unroll
      for (int mt = 0; mt < kMmaTilesN; ++mt)
#pragma unroll
        for (int nt = 0; nt < Tr::kMmaTilesM; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[w][mt][nt][e] = 0.0f;

    // The previous tile's last stage may still be read by other warps.
    __syncthreads();
    const int kts = v.num_k_stages;                // sub-stages of kStageK values
    const int stages = (kts + kSub - 1) / kSub;    // pipeline stages
    load_prologue<kStages>(loader, smem, kts);
    for (int kt = 0; kt < stages; ++kt) {
      cp_async_wait<kStages - 2>();  // stage kt has landed (for this thread's copies) ...
      __syncthreads();               // ... for every thread's; all are done with stage kt - 1
      loader.template load_if<kStages>(smem, kt + kStages - 1, kts);
      cp_async_commit();
      unsigned char* slot = smem + (kt % kStages) * Tr::kSlotBytes;
      const int subs = kSub == 1 ? 1 : min(kSub, kts - kt * kSub);  // sub-stages of this stage
      if constexpr (kTokens == kTokensNVFP4) {  // one sub-stage (static_assert in GemmTraits)
        dequant_tokens<Tr, kTokens, kDual, kBlockM>(St{slot}, tokens_f16_buf);
        __syncthreads();
      }
#pragma unroll
      for (int sub = 0; sub < kSub; ++sub) {
        if (sub < subs) {
          const St st{slot + sub * Tr::kStageBytes};
          compute_stage<Tr, kTokens, kDual>(st, kTokens == kTokensNVFP4 ? tokens_f16_buf : st.tokens(), acc, warp_n,
                                            warp_m);
        }
      }
    }
    cp_async_wait<0>();

    // Epilogue: acc[w][mt][nt][2h + e] is (weight row g + 8h of tile mt, token 2t + e of tile nt).
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < kMmaTilesN; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = v.n0 + warp_n * kWarpRowsN + mt * 16 + h * 8 + g;
        if (col >= v.n) continue;
#pragma unroll
        for (int nt = 0; nt < Tr::kMmaTilesM; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int m = v.m0 + warp_m * Tr::kWarpTokens + nt * 8 + 2 * t + e;
            if (m >= v.rows) continue;
            float out = p.alpha * acc[0][mt][nt][2 * h + e];
            if constexpr (kDual) out = silu(out) * (p.alpha2 * acc[Tr::kWeights - 1][mt][nt][2 * h + e]);
            store_out(p, out_dtype, static_cast<long long>(v.row_base) + m, col, out);
          }
      }
  }
}

// ================================================================================================
// Hopper (sm_90a): the same GEMM on wgmma.mma_async (common/wgmma.cuh), warp-specialized
// ================================================================================================
//
// Three warpgroups per CTA (384 threads). Warpgroup 0 is the producer: its 128 threads only copy
// (cp.async) the weights, their scales and the fp16/bf16 token tile of each stage into a ring of
// kStages shared-memory stages, and publish each stage on its `full` mbarrier. Warpgroups 1 and 2 are
// the consumers, each owning half of the tile's weight rows in row blocks of 64 (warp w of a consumer
// warpgroup: 16 rows of each block): they dequantize their weight rows of a stage into registers and
// issue one wgmma m64 n(kBlockM) k16 per k step, row block and weight operand, A = the dequantized weights from registers (each
// warp's 16 x 16 slice in the mma.m16n8k16 A layout), B = the stage's tokens from shared memory
// through a descriptor; then they release the stage on its `empty` mbarrier. Accumulators stay in
// registers (kBlockM / 2 floats per thread and weight operand). Producer and consumers walk the same
// persistent tile sequence; the ring runs on across tiles, so the next tile's first stages land
// while the consumers store the last one.
//
// Measured before (session 2, NOTES.md): the single-role wgmma kernel (every thread copying,
// dequantizing and issuing, a block barrier per stage) ran at 2 warps per scheduler with the tensor
// pipe mostly idle (ncu: 0.01 cycles of gmma stall per instruction, 2.5 of long scoreboard).
//
// W4A4 tokens are dequantized once per call into an fp16 workspace by dequant_tokens_kernel (below)
// and then read as W4A16 tokens: they would otherwise be dequantized again by every CTA of the
// problem's N tiles.
//
// Producer pipeline: each producer thread issues its copies of a stage and then an asynchronous
// arrival on the stage's `full` mbarrier that fires when those copies have landed
// (cp.async.mbarrier.arrive.noinc), so the producer never waits on its own copies and up to kStages
// stages are in flight. A consumer that sees a stage full executes fence.proxy.async before its
// wgmmas read the stage (cp.async lands through the generic proxy, wgmma reads through the async one).
// Measured before (session 3): the producer published stage q after cp.async.wait_group and its own
// fence.proxy.async; time per stage did not move with the publish lag (2, 4, 6) or the ring depth
// (4, 8), as if every stage waited out a whole copy latency.
//
// K order: natural (the MMA's k step s of a stage is values 16s .. 16s+15), because B's 16-byte
// chunks must be 8 consecutive token values as cp.async lands them. The A fragment of thread (g, t)
// then needs, per row, values 16s + 2t + {0, 1} and 16s + 8 + 2t + {0, 1}: byte t of each 4-byte word
// of the row's 32 packed bytes (the row is read whole and its bytes gathered with prmt).
//
// Token tile in shared memory (per stage, 1024-byte aligned): wgmma's K-major 128-byte swizzled
// layout. Token row r (64 K values, 128 bytes) lies at r * 128, its 16-byte chunk c (values 8c ..
// 8c+7) at chunk position c ^ (r % 8). The 8 threads copying one row write 8 distinct bank groups,
// and read one whole 128-byte line of global memory. Descriptor: 128B swizzle, SBO = 1024 (the next
// 8 tokens), LBO unused; k step s starts 32 s bytes into the tile.
// Measured before (session 4, ablation on the H100): the earlier no-swizzle core-matrix layout had
// 8 threads copy one 16-byte chunk of 8 rows each, twice the L2 sectors of the data (ncu source
// counters), and token copies held the kernel at 3x the time it took without them.
//
// CTA tile: kRowBlocks x 128 weight rows (each consumer warpgroup kRowBlocks wgmma row blocks of
// 64). Two row blocks (single weight operand, at most 128 tokens) feed each token byte read from L2
// to twice the MMAs but halve the tiles (cuflash/gemm.py chooses per call). With two or more
// accumulator sets (two row blocks, or the dual GEMM's two operands) the consumers pipeline per set
// (one fragment buffer each) rather than per stage (two), which leaves room for 2 x 64 accumulators.
constexpr int kWgConsumers = 2;                              // consumer warpgroups
constexpr int kWgThreads = (1 + kWgConsumers) * kWarpgroupThreads;  // 384 threads per CTA
constexpr int kWgConsumerThreads = kWgConsumers * kWarpgroupThreads;
constexpr int kWgTokenRowBytes = kStageK * 2;                // 128: one swizzle row per token and stage
constexpr int kWgSbo = kSwizzleAtomBytes;                    // N direction: the next 8 tokens (1024)
constexpr int kWgKStepBytes = 16 * 2;                        // K direction: 16 values per wgmma k step
constexpr int kWgKSteps = kStageK / 16;                      // 4 wgmma k steps per stage
// Registers per thread after the split (setmaxnreg): the producer keeps its copy pointers, the
// consumers their accumulators and two stages of fragments; 128 * 104 + 256 * 200 = 64512 (ptxas: 8
// bytes spilled at 128 tokens x 2 sets; more at 96/208 and 88/208). The CTA starts with 168 per thread
// (__launch_bounds__(384, 1): 65536 / 384 rounded down to a multiple of 8), and the split must fit in
// those 64512: setmaxnreg.inc waits until enough registers are free, so a split summing to 65536
// (72 + 2 x 216 was fine, 80 + 2 x 216 was not) hung every launch on the H100 (session 7).
constexpr int kWgProducerRegs = 104;
constexpr int kWgConsumerRegs = 200;
constexpr int kWgLaunchRegs = (65536 / kWgThreads) / 8 * 8;
static_assert(kWarpgroupThreads * (kWgProducerRegs + kWgConsumers * kWgConsumerRegs) <= kWgThreads * kWgLaunchRegs,
              "the register split must fit in the registers the CTA is launched with");

template <int kBlockM, int kRowBlocks_, int kStages, int kTokens, bool kDual>
struct WgmmaTraits {
  static_assert(kTokens != kTokensNVFP4, "W4A4 tokens reach the wgmma kernel dequantized (dequant_tokens_kernel)");
  using MmaT = typename MmaType<kTokens>::type;
  static constexpr int kThreads = kWarpgroupThreads;  // the producer's threads: TileLoader splits copies over them
  static constexpr int kWeights = kDual ? 2 : 1;
  static constexpr int kRowBlocks = kRowBlocks_;  // wgmma row blocks of 64 per consumer warpgroup (1 or 2)
  static constexpr int kSub = 1;                  // one kStageK step per ring stage (TileLoader)
  static_assert(kRowBlocks == 1 || kRowBlocks == 2, "one or two row blocks per consumer warpgroup");
  static constexpr int kSets = kWeights * kRowBlocks;          // accumulator sets: set w * kRowBlocks + b
  static constexpr int kBlockRows = kWgConsumers * kWgmmaM * kRowBlocks;  // weight rows per CTA tile
  static constexpr int kAcc = kBlockM / 2;  // fp32 accumulators per thread and set
  static constexpr int kWeightBytes = kBlockRows * kStagePackedBytes;
  static constexpr int kWeightScaleBytes = kBlockRows * kStageScales;
  static constexpr int kTokenBytes = kBlockM * kWgTokenRowBytes;
  static constexpr int kTokenOffset = 0;  // stage layout: the swizzled token tile first (1024-aligned)
  static constexpr int kWeightOffset = kTokenBytes;
  static constexpr int kStageBytes =
      (kTokenBytes + kWeights * (kWeightBytes + kWeightScaleBytes) + kSwizzleAtomBytes - 1) / kSwizzleAtomBytes *
      kSwizzleAtomBytes;
  static constexpr int kSlotBytes = kStageBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  // Epilogue buffer of each consumer warpgroup (after the ring): one 64-row block of its 16-bit output
  // tile, token-major, kBlockM rows of 64 values + 16 bytes of padding (see store_tile_16).
  static constexpr int kEpiPitch = kWgmmaM * 2 + 16;
  static constexpr int kEpiBytes = kBlockM * kEpiPitch;
  static constexpr int kSmemBytes = kPipeBytes + kWgConsumers * kEpiBytes;  // then the mbarriers
  static_assert(kBlockM % 16 == 0 && kBlockM >= 16 && kBlockM <= 256, "wgmma N: a multiple of 16 up to 256");
  static_assert(kStages >= 2, "a ring of at least two stages");
  static_assert(kSets * kAcc <= 128, "accumulators: at most 128 registers per consumer thread");
  // Swizzled position of chunk c of token row r (see above).
  __device__ __forceinline__ static int token_chunk_offset(int r, int c) {
    return r * kWgTokenRowBytes + ((c ^ (r % 8)) << 4);
  }
};

// Byte t of each of the words w0..w3, as one word (byte i from w_i).
__device__ __forceinline__ unsigned gather_byte(unsigned w0, unsigned w1, unsigned w2, unsigned w3, int t) {
  const unsigned sel = static_cast<unsigned>(t) | (static_cast<unsigned>(t + 4) << 4);
  return __byte_perm(__byte_perm(w0, w1, sel), __byte_perm(w2, w3, sel), 0x5410u);
}

// A fragments of one stage and accumulator set for this thread: a[s] feeds k step s of set
// w * kRowBlocks + b (weight operand w, row block b). Rows row0 + 64 b (g) and row0 + 64 b + 8 (g + 8).
template <class Tr, int kTokens, bool kDual>
__device__ __forceinline__ void set_fragments(const Stage<Tr, kTokens, kDual>& st, int row0, int set,
                                              unsigned (&a)[kWgKSteps][4]) {
  using T = typename Tr::MmaT;
  const int t = threadIdx.x & 3;
  const int w = set / Tr::kRowBlocks, b = set % Tr::kRowBlocks;
  Pairs4 p[2][2];  // [row g / g+8][k steps 0-1 / 2-3]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + kWgmmaM * b + 8 * h;
    const uint4 lo = *reinterpret_cast<const uint4*>(st.weights(w) + r * kStagePackedBytes);
    const uint4 hi = *reinterpret_cast<const uint4*>(st.weights(w) + r * kStagePackedBytes + 16);
    __half2 f01, f23;  // the factors of scale blocks 0, 1 and 2, 3
    scale_factors4(*reinterpret_cast<const unsigned*>(st.weight_scales(w) + r * kStageScales), f01, f23);
    // byte i of x: chunk i (k steps 0, 1: scale blocks 0, 1); of y: chunk 4 + i (blocks 2, 3); bytes
    // 0-1 of each gathered word belong to the first of its two blocks, bytes 2-3 to the second
    p[h][0] = dequant_e2m1x8<T>(gather_byte(lo.x, lo.y, lo.z, lo.w, t), __low2half2(f01), __high2half2(f01));
    p[h][1] = dequant_e2m1x8<T>(gather_byte(hi.x, hi.y, hi.z, hi.w, t), __low2half2(f23), __high2half2(f23));
  }
#pragma unroll
  for (int s = 0; s < kWgKSteps; ++s) {
    const int q = s / 2, c = 2 * (s % 2);  // chunk 2s is pair c of word q, chunk 2s+1 pair c+1
    a[s][0] = p[0][q].p[c];      // (row g,     k 2t, 2t+1)
    a[s][1] = p[1][q].p[c];      // (row g + 8, k 2t, 2t+1)
    a[s][2] = p[0][q].p[c + 1];  // (row g,     k 2t+8, 2t+9)
    a[s][3] = p[1][q].p[c + 1];  // (row g + 8, k 2t+8, 2t+9)
  }
}

// Keeps fragments of a wgmma that has retired from being rewritten before its wgmma_wait.
__device__ __forceinline__ void fence_fragments(unsigned (&a)[kWgKSteps][4]) {
#pragma unroll
  for (int s = 0; s < kWgKSteps; ++s) wgmma_fence_operand(a[s]);
}

// Issues (and commits as one group) the 4 wgmmas of one accumulator set and stage; they run on while
// the caller prepares other fragments. `a` must stay untouched until they complete.
template <class Tr, int kBlockM>
__device__ __forceinline__ void issue_set_wgmma(const unsigned char* tokens_f16, float (&acc)[Tr::kAcc],
                                                unsigned (&a)[kWgKSteps][4]) {
  using T = typename Tr::MmaT;
  const unsigned long long desc = wgmma_desc_sw128(tokens_f16, kWgSbo);
  wgmma_fence_operand(acc);
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < kWgKSteps; ++s) wgmma_m64k16_rs<kBlockM, T>(acc, a[s], wgmma_desc_advance(desc, s * kWgKStepBytes));
  wgmma_commit();
}

// Stream-K (Osama et al., 2023): with a partials workspace, CTA c covers the units [U c / G, U (c + 1) / G)
// of the U = tiles x k-stages (tile, stage) units of the call (tile-major; every problem has the same K,
// the host's rule), G = gridDim.x <= U, so every CTA gets the same number of stages (to within one) however
// the tiles fall into waves. A tile split over several CTAs ("pieces") is summed by the piece that
// finishes last: each piece parks its fp32 accumulators in its CTA's slot (slot 0: the CTA's first
// segment, 1: its last), then counts itself on the tile's counter (arrive_is_last, common/last_arrival.cuh,
// as the attention split merge); the piece that brings the count to the number of pieces sums every slot
// in CTA order (deterministic) and runs the epilogue. Without a workspace (data parallel) the CTAs walk
// whole tiles blockIdx.x, blockIdx.x + G, ...
struct StreamK {
  float* partials;  // null: data parallel
  int* counters;    // one per tile, zero between launches
};

struct Segment {
  int tile;
  int kt0, kt1;  // stages [kt0, kt1) of the tile (kt1 past the end in data-parallel mode: the whole tile)
  bool first;    // the first segment of this CTA (stream-K slot 0)
};

__device__ __forceinline__ long long sk_unit_begin(int cta, long long units) {
  return units * cta / gridDim.x;
}

// The CTA whose range holds unit u: the largest c with sk_unit_begin(c) <= u.
__device__ __forceinline__ int sk_cta_of_unit(long long u, long long units) {
  return static_cast<int>(((u + 1) * gridDim.x + units - 1) / units) - 1;
}

struct SegmentWalk {
  bool stream_k;
  int kts;          // stream-K: the k-stages of every tile
  int total_tiles;
  long long u, u1;  // stream-K: the next unit and the end of this CTA's range
  int tile;         // data parallel: the next tile
  bool first = true;

  __device__ __forceinline__ SegmentWalk(bool sk, int total, int k_stages)
      : stream_k(sk), kts(k_stages), total_tiles(total), tile(blockIdx.x) {
    const long long units = static_cast<long long>(total) * k_stages;
    u = sk ? sk_unit_begin(blockIdx.x, units) : 0;
    u1 = sk ? sk_unit_begin(blockIdx.x + 1, units) : 0;
  }

  __device__ __forceinline__ bool next(Segment& s) {
    if (!stream_k) {
      if (tile >= total_tiles) return false;
      s = {tile, 0, 1 << 30, first};
      tile += gridDim.x;
    } else {
      if (u >= u1) return false;
      s.tile = static_cast<int>(u / kts);
      s.kt0 = static_cast<int>(u % kts);
      s.kt1 = static_cast<int>(min(static_cast<long long>(kts), s.kt0 + (u1 - u)));
      s.first = first;
      u += s.kt1 - s.kt0;
    }
    first = false;
    return true;
  }
};

constexpr unsigned kSkBarrier = 1;  // named barrier of the consumer warpgroups (0 is __syncthreads)

// A stream-K piece of tile seg.tile (all consumer threads): park acc, count in; true (with every other
// piece added into acc) for the last piece, which then stores the tile. `flag`: one shared int.
template <class Tr>
__device__ __forceinline__ bool stream_k_fixup(const StreamK& sk, const Segment& seg, int kts, int total_tiles,
                               float (&acc)[Tr::kSets][Tr::kAcc], int* flag) {
  constexpr int kSlot = Tr::kSets * Tr::kAcc * kWgConsumerThreads;
  const int ct = threadIdx.x - kWarpgroupThreads;
  const long long units = static_cast<long long>(total_tiles) * kts;
  float* mine = sk.partials + (2ll * blockIdx.x + (seg.first ? 0 : 1)) * kSlot;
#pragma unroll
  for (int set = 0; set < Tr::kSets; ++set)
#pragma unroll
    for (int i = 0; i < Tr::kAcc; ++i) __stcg(mine + (set * Tr::kAcc + i) * kWgConsumerThreads + ct, acc[set][i]);
  named_barrier_sync(kSkBarrier, kWgConsumerThreads);  // every consumer thread's part is parked
  const long long t0 = static_cast<long long>(seg.tile) * kts;
  const int c0 = sk_cta_of_unit(t0, units), c1 = sk_cta_of_unit(t0 + kts - 1, units);
  if (ct == 0) *flag = arrive_is_last(sk.counters + seg.tile, c1 - c0 + 1);
  named_barrier_sync(kSkBarrier, kWgConsumerThreads);
  const bool last = *flag != 0;
  named_barrier_sync(kSkBarrier, kWgConsumerThreads);  // the flag is read before the next piece rewrites it
  if (!last) return false;
  // The pieces are summed in CTA order, this CTA's own parked piece read back in its place, so that the sum
  // does not depend on which piece finished last: the same inputs give the same bits on every run
  // (summing the others into its registers made the result vary by an ulp from run to run, and a greedy
  // LLM decode could then take another token at a near-tie; bench/bench_llm.py, session 12).
  auto piece = [&](int c) {  // CTA c's parked piece of this tile: its first segment, or its last
    return sk.partials + (2ll * c + (sk_unit_begin(c, units) >= t0 ? 0 : 1)) * kSlot;
  };
  const float* first = piece(c0);
#pragma unroll
  for (int set = 0; set < Tr::kSets; ++set)
#pragma unroll
    for (int i = 0; i < Tr::kAcc; ++i) acc[set][i] = __ldcg(first + (set * Tr::kAcc + i) * kWgConsumerThreads + ct);
  for (int c = c0 + 1; c <= c1; ++c) {
    const float* other = piece(c);
#pragma unroll
    for (int set = 0; set < Tr::kSets; ++set)
#pragma unroll
      for (int i = 0; i < Tr::kAcc; ++i) acc[set][i] += __ldcg(other + (set * Tr::kAcc + i) * kWgConsumerThreads + ct);
  }
  return true;
}

// The ring's mbarriers: full[s] completes when the producer has published stage slot s (one arrival
// per producer thread), empty[s] when every consumer thread is done with it (one arrival each: with
// one arrival per warp after __syncwarp, compute-sanitizer racecheck reported the producer's next
// copies into the slot as WAR hazards against the other lanes' reads, 12 on the float16 sanitize
// case; per-thread arrivals report none and time the same on the GPU MODE cases, session 5).
// Use u = q / kStages of slot s = q % kStages is phase u of both barriers.
struct Ring {
  unsigned long long* full;
  unsigned long long* empty;
};

// Warpgroup 0: copies every stage of every tile of this CTA into the ring.
template <class Tr, int kBlockM, int kStages, int kTokens, bool kDual>
__device__ __forceinline__ void produce(unsigned char* smem, Ring ring, const GemmProblem* __restrict__ problems,
                                        int num_problems, const int* __restrict__ offsets, const int* prefix,
                                        int total_tiles, bool blocked, bool stream_k) {
  using St = Stage<Tr, kTokens, kDual>;
  griddep_wait();  // W4A4: dequant_tokens_kernel, launched just before (programmatic launch), has finished
  int q = 0;  // stages issued so far, over all segments
  SegmentWalk walk(stream_k, total_tiles, problems[0].k / kStageK);
  Segment seg;
  while (walk.next(seg)) {
    const TileView v = make_tile_view<kDual, Tr::kBlockRows>(problems, num_problems, offsets, prefix, seg.tile, kBlockM, blocked);
    const TileLoader<Tr, kTokens, kDual, kBlockM> loader(v);
    const int kt1 = min(seg.kt1, v.num_k_stages);
    for (int kt = seg.kt0; kt < kt1; ++kt, ++q) {
      const int slot = q % kStages;
      if (q >= kStages) mbar_wait(&ring.empty[slot], ((q / kStages) - 1) & 1);  // use u - 1 released
      loader.load(St{smem + slot * Tr::kStageBytes}, kt);
      cp_async_mbar_arrive(&ring.full[slot]);  // fires once this thread's copies so far have landed
    }
  }
  cp_async_commit();  // leave no copy of this thread in flight at exit
  cp_async_wait<0>();
}

// The epilogue's value of accumulator i of set b (weight operand 0; dual: silu-gated by operand 1).
template <class Tr, bool kDual>
__device__ __forceinline__ float epilogue_value(const GemmProblem& p, const float (&acc)[Tr::kSets][Tr::kAcc], int b,
                                                int i) {
  const float out = p.alpha * acc[b][i];
  if constexpr (kDual) return silu(out) * (p.alpha2 * acc[Tr::kRowBlocks + b][i]);
  return out;
}

// Epilogue, element by element (fp32 output): acc[w * kRowBlocks + b][4j + e] is (weight row row0 + 64 b +
// 8 (e >= 2), token 8j + 2t + (e & 1)); row0 as in consume.
template <class Tr, int kBlockM, bool kDual>
__device__ __forceinline__ void store_tile_direct(const TileView& v, const float (&acc)[Tr::kSets][Tr::kAcc],
                                                  int out_dtype, int row0) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int b = 0; b < Tr::kRowBlocks; ++b)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int col = v.n0 + row0 + kWgmmaM * b + 8 * h;
      if (col >= v.n) continue;
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = v.m0 + 8 * j + 2 * t + e;
          if (m >= v.rows) continue;
          store_out(*v.problem, out_dtype, static_cast<long long>(v.row_base) + m, col,
                    epilogue_value<Tr, kDual>(*v.problem, acc, b, 4 * j + 2 * h + e));
        }
    }
}

constexpr unsigned kEpiBarrier = 2;  // named barriers 2 and 3: consumer warpgroup 0's and 1's epilogue

// Epilogue of a 16-bit output (all threads of both consumer warpgroups). Each warpgroup writes one 64-row
// block of its tile at a time into its buffer in shared memory, token-major (stmatrix.trans: one x4 per
// 16 tokens per warp), then its 128 threads copy the buffer to C in 16-byte pieces: 8 consecutive
// outputs of one token row, coalesced, instead of one 2-byte store per value (measured on the H100,
// session 11: the element-wise epilogue cost ~4 us per round of tiles). Pieces past N, and every piece
// when C's rows are not 16-byte aligned, are stored value by value. Buffer rows are kEpiPitch bytes
// (128 + 16), so the 8 rows of a stmatrix and the 4 rows a warp reads per load hit distinct banks.
template <class Tr, int kBlockM, bool kDual, typename OutT>
__device__ __forceinline__ void store_tile_16(unsigned char* epi, const TileView& v,
                                              const float (&acc)[Tr::kSets][Tr::kAcc]) {
  const GemmProblem& p = *v.problem;
  const int cw = threadIdx.x / 32 - kWarpgroupThreads / 32, wg = cw / 4, w = cw % 4;
  const int lane = threadIdx.x & 31, wt = threadIdx.x % kWarpgroupThreads;
  unsigned char* buf = epi + wg * Tr::kEpiBytes;
  const unsigned bar = kEpiBarrier + wg;
  OutT* c = reinterpret_cast<OutT*>(p.c);
  const bool vec = (p.c % 16 == 0) && (p.c_row % 8 == 0);
#pragma unroll
  for (int b = 0; b < Tr::kRowBlocks; ++b) {
    named_barrier_sync(bar, kWarpgroupThreads);  // the previous block's (or tile's) reads of buf are done
    // matrix x of a stmatrix.x4: tokens 8 (2jj + x / 2) .. +7, weight rows 16 w + 8 (x % 2) .. +7 of the block
#pragma unroll
    for (int jj = 0; jj < kBlockM / 16; ++jj) {
      unsigned r[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int i = 4 * (2 * jj + x / 2) + 2 * (x % 2);
        r[x] = pack2<OutT>(epilogue_value<Tr, kDual>(p, acc, b, i), epilogue_value<Tr, kDual>(p, acc, b, i + 1));
      }
      const int x = lane >> 3;
      stmatrix_x4_trans(buf + (8 * (2 * jj + x / 2) + (lane & 7)) * Tr::kEpiPitch + (16 * w + 8 * (x % 2)) * 2, r);
    }
    named_barrier_sync(bar, kWarpgroupThreads);  // the block is in buf
    const int col0 = v.n0 + (wg * Tr::kRowBlocks + b) * kWgmmaM;
#pragma unroll
    for (int it = 0; it < kBlockM * 8 / kWarpgroupThreads; ++it) {
      const int i = wt + it * kWarpgroupThreads, row = i / 8, col = col0 + 8 * (i % 8);
      const int m = v.m0 + row;
      if (m >= v.rows || col >= v.n) continue;
      const uint4 val = *reinterpret_cast<const uint4*>(buf + row * Tr::kEpiPitch + (i % 8) * 16);
      OutT* dst = c + (static_cast<long long>(v.row_base) + m) * p.c_row + col;
      if (vec && col + 8 <= v.n) {
        *reinterpret_cast<uint4*>(dst) = val;
      } else {
        const unsigned words[4] = {val.x, val.y, val.z, val.w};
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const unsigned short bits = static_cast<unsigned short>(words[k / 2] >> (16 * (k % 2)));
          if (col + k < v.n) *reinterpret_cast<unsigned short*>(dst + k) = bits;
        }
      }
    }
  }
}

// Warpgroups 1 and 2: dequantize, multiply, store. Consumer warp cw (warp cw % 4 of consumer
// warpgroup cw / 4) owns weight rows row0 + 64 b + {0..7, 8..15} - g of row block b of each tile.
template <class Tr, int kBlockM, int kStages, int kTokens, bool kDual>
__device__ __forceinline__ void consume(unsigned char* smem, Ring ring, const GemmProblem* __restrict__ problems,
                                        int num_problems, const int* __restrict__ offsets, const int* prefix,
                                        int total_tiles, bool blocked, int out_dtype, StreamK sk, int* flag) {
  using St = Stage<Tr, kTokens, kDual>;
  const int cw = threadIdx.x / 32 - kWarpgroupThreads / 32;
  const int lane = threadIdx.x & 31, g = lane >> 2;
  const int row0 = (cw / 4) * (kWgmmaM * Tr::kRowBlocks) + (cw % 4) * 16 + g;
  auto stage = [&](int q) { return St{smem + (q % kStages) * Tr::kStageBytes}; };
  // Stage q has landed (its weights may be read now). Its token tile becomes visible to this
  // thread's wgmmas only after fence_proxy_async_shared() (MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S in
  // SASS), which the consumers execute just before the stage's first wgmma. Placed here instead
  // (before the dequant) it timed the same (session 6, H100: 234.9 against 232.0 us, GPU MODE case 1).
  auto acquire = [&](int q) { mbar_wait(&ring.full[q % kStages], (q / kStages) & 1); };
  auto release = [&](int q) {  // after wgmma_wait: this thread's wgmmas and fragment reads of stage q are done
    mbar_arrive(&ring.empty[q % kStages]);
  };
  int q = 0;  // stages consumed so far, over all segments
  const int sk_kts = problems[0].k / kStageK;
  SegmentWalk walk(sk.partials != nullptr, total_tiles, sk_kts);
  Segment seg;
  while (walk.next(seg)) {
    const TileView v = make_tile_view<kDual, Tr::kBlockRows>(problems, num_problems, offsets, prefix, seg.tile, kBlockM, blocked);
    float acc[Tr::kSets][Tr::kAcc];
#pragma unroll
    for (int set = 0; set < Tr::kSets; ++set)
#pragma unroll
      for (int i = 0; i < Tr::kAcc; ++i) acc[set][i] = 0.0f;

    const int kts = min(seg.kt1, v.num_k_stages) - seg.kt0;  // stages of this segment (their data is in the ring)
    if constexpr (Tr::kSets >= 2) {
      // One commit group per (stage, set), one fragment buffer per set: set j of stage kt is
      // dequantized once set j of stage kt - 1 has retired (kSets - 1 later groups still run), so
      // the other sets' wgmmas cover the dequant with half the fragment registers of two whole stages.
      unsigned a[Tr::kSets][kWgKSteps][4];
      for (int kt = 0; kt < kts; ++kt) {
        acquire(q + kt);
#pragma unroll
        for (int set = 0; set < Tr::kSets; ++set) {
          if (kt > 0) {
            wgmma_wait<Tr::kSets - 1>();  // set `set` of stage kt - 1 has retired
            wgmma_fence_operand(acc[set]);
            fence_fragments(a[set]);
            if (set == Tr::kSets - 1) release(q + kt - 1);  // every set of stage kt - 1 is done with it
          }
          set_fragments<Tr, kTokens, kDual>(stage(q + kt), row0, set, a[set]);
          if (set == 0) fence_proxy_async_shared();
          issue_set_wgmma<Tr, kBlockM>(stage(q + kt).tokens(), acc[set], a[set]);
        }
      }
    } else {
      // One set: fragments of stage kt in a[kt % 2] (named at compile time: two stages per trip).
      // Stage kt's wgmmas run while stage kt + 1 is dequantized; the wait retires stage kt - 1's.
      unsigned a0[kWgKSteps][4], a1[kWgKSteps][4];
      acquire(q);
      set_fragments<Tr, kTokens, kDual>(stage(q), row0, 0, a0);
      auto step = [&](int kt, unsigned (&cur)[kWgKSteps][4], unsigned (&nxt)[kWgKSteps][4]) {
        fence_proxy_async_shared();
        issue_set_wgmma<Tr, kBlockM>(stage(q + kt).tokens(), acc[0], cur);
        wgmma_wait<1>();
        fence_fragments(nxt);
        if (kt > 0) release(q + kt - 1);
        if (kt + 1 < kts) {
          acquire(q + kt + 1);
          set_fragments<Tr, kTokens, kDual>(stage(q + kt + 1), row0, 0, nxt);
        }
      };
      for (int kt = 0; kt < kts; kt += 2) {
        step(kt, a0, a1);
        if (kt + 1 < kts) step(kt + 1, a1, a0);
      }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int set = 0; set < Tr::kSets; ++set) wgmma_fence_operand(acc[set]);
    release(q + kts - 1);
    q += kts;
    if (seg.kt0 > 0 || seg.kt0 + kts < v.num_k_stages) {  // a piece of a stream-K tile: the last piece stores it
      if (!stream_k_fixup<Tr>(sk, seg, sk_kts, total_tiles, acc, flag)) continue;
    }

    if (out_dtype == kOutF16) store_tile_16<Tr, kBlockM, kDual, __half>(smem + Tr::kPipeBytes, v, acc);
    else if (out_dtype == kOutBF16) store_tile_16<Tr, kBlockM, kDual, __nv_bfloat16>(smem + Tr::kPipeBytes, v, acc);
    else store_tile_direct<Tr, kBlockM, kDual>(v, acc, out_dtype, row0);
  }
}

// Same arguments and launch rules as group_gemm_kernel (kTokens: fp16 or bf16 only), plus the stream-K
// workspace (see StreamK; null: data parallel): sk_partials holds 2 slots of kSets x kAcc x 256 floats per
// CTA, sk_counters one zeroed int per tile; stream-K needs every problem to have the same K and a grid of
// at most tiles x k-stages CTAs. kWgThreads (384) threads per CTA; dynamic shared memory: up to 1024
// bytes of alignment slack, the ring, the two epilogue buffers, 2 kStages mbarriers, the tile prefix, one
// int (the fixup's flag).
template <int kBlockM, int kRowBlocks, int kStages, int kTokens, bool kDual>
__global__ void __launch_bounds__(kWgThreads, 1)
    group_gemm_wgmma_kernel(const GemmProblem* __restrict__ problems, int num_problems, const int* __restrict__ offsets,
                            int blocked_scales, int out_dtype, float* sk_partials, int* sk_counters) {
  using Tr = WgmmaTraits<kBlockM, kRowBlocks, kStages, kTokens, kDual>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // the swizzled token tiles need 1024-byte aligned shared addresses (the host adds the slack)
  const unsigned raw_addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + ((kSwizzleAtomBytes - raw_addr % kSwizzleAtomBytes) % kSwizzleAtomBytes);
  const Ring ring{reinterpret_cast<unsigned long long*>(smem + Tr::kSmemBytes),
                  reinterpret_cast<unsigned long long*>(smem + Tr::kSmemBytes) + kStages};
  int* prefix = reinterpret_cast<int*>(ring.empty + kStages);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&ring.full[s], kWarpgroupThreads);
      mbar_init(&ring.empty[s], kWgConsumerThreads);
    }
  }
  build_tile_prefix<kBlockM, Tr::kBlockRows>(problems, num_problems, offsets, prefix);  // ends with a barrier
  const int total_tiles = prefix[num_problems];
  if (threadIdx.x < kWarpgroupThreads) {
    warpgroup_release_registers<kWgProducerRegs>();
    produce<Tr, kBlockM, kStages, kTokens, kDual>(smem, ring, problems, num_problems, offsets, prefix, total_tiles,
                                                  blocked_scales != 0, sk_partials != nullptr);
  } else {
    warpgroup_claim_registers<kWgConsumerRegs>();
    consume<Tr, kBlockM, kStages, kTokens, kDual>(smem, ring, problems, num_problems, offsets, prefix, total_tiles,
                                                  blocked_scales != 0, out_dtype, StreamK{sk_partials, sk_counters},
                                                  prefix + num_problems + 1);
  }
}

// W4A4 before the wgmma kernel (and the portable kernel's 16-token tiles): the packed NVFP4 tokens of
// problem blockIdx.y (a, sfa of its table entry; the host passes a ragged call's shared token matrix as
// one entry) dequantized to exact fp16 q * s (no alpha) into rows of `c` (c_row elements apart: the
// call's workspace, not its output). One thread per scale block of 16 values: an 8-byte load,
// one scale byte, two 16-byte stores.
constexpr int kDequantThreads = 256;
__global__ void __launch_bounds__(kDequantThreads)
    dequant_tokens_kernel(const GemmProblem* __restrict__ problems, const int* __restrict__ offsets, int blocked_scales) {
  griddep_launch_dependents();  // the wgmma kernel after it may start loading (it waits for these tokens)
  const GemmProblem& p = problems[blockIdx.y];
  const ProblemRows rows = problem_rows(p, offsets);
  const int blocks_per_row = p.k / kScaleBlock;
  const long long items = static_cast<long long>(rows.rows) * blocks_per_row;
  for (long long i = static_cast<long long>(blockIdx.x) * kDequantThreads + threadIdx.x; i < items;
       i += static_cast<long long>(gridDim.x) * kDequantThreads) {
    const int r = static_cast<int>(i / blocks_per_row), b = static_cast<int>(i % blocks_per_row);
    const long long row = rows.row_base + r;
    const uint2 packed = *reinterpret_cast<const uint2*>(reinterpret_cast<const unsigned char*>(p.a) + row * p.a_row + b * 8);
    const unsigned char sbits = scale_ptr(p.sfa, static_cast<int>(row), b / kStageScales, p.sfa_row, blocked_scales != 0,
                                          p.k / kStageK)[b % kStageScales];
    const __half2 factor = scale_factor(sbits);
    const Pairs4 lo = dequant_e2m1x8_f16(packed.x, factor);
    const Pairs4 hi = dequant_e2m1x8_f16(packed.y, factor);
    uint4* dst = reinterpret_cast<uint4*>(reinterpret_cast<__half*>(p.c) + row * p.c_row + b * kScaleBlock);
    dst[0] = as_uint4(lo);
    dst[1] = as_uint4(hi);
  }
}

}  // namespace cuflash
