// Paged KV-cache addressing.
//
// Pools k_pages / v_pages: [num_pages, page_size, kv_heads, head_dim], NHD, C-contiguous.
// block_table: int32 [batch, table_stride]; entry p of row b is the page holding keys
// p * page_size .. (p + 1) * page_size - 1 of sequence b. Any page size >= 1, pages in any order.
#pragma once


namespace cuflash {
namespace attn {

struct PagedKV {
  const int* __restrict__ table;  // this sequence's block-table row
  int token_stride;       // elements between consecutive tokens of one page: kv_heads * head_dim
  int head_offset;        // elements from a token's start to this CTA's kv head: kv_head * head_dim
  long long page_stride;  // elements between pages: page_size * token_stride

  __device__ __forceinline__ PagedKV(const int* row, int page_size, int kv_heads, int head_dim, int kv_head)
      : table(row), token_stride(kv_heads * head_dim), head_offset(kv_head * head_dim),
        page_stride(static_cast<long long>(page_size) * kv_heads * head_dim) {}

  // Element offset inside a pool of slot `in_page` of table entry `entry`, this kv head. The page id
  // comes from the table (L1-resident after the first tile).
  __device__ __forceinline__ long long offset(int entry, int in_page) const {
    return static_cast<long long>(__ldg(table + entry)) * page_stride + in_page * token_stride + head_offset;
  }
};

// The (table entry, slot) of keys key0, key0 + kStep, key0 + 2 kStep, ... of one sequence, advanced
// without a division per key (the copy loops take a tile's rows kStep apart).
template <int kStep>
struct PageWalk {
  int page_size, entry, in_page;

  __device__ __forceinline__ PageWalk(int key0, int page_size_)
      : page_size(page_size_), entry(key0 / page_size_), in_page(key0 - entry * page_size_) {}

  __device__ __forceinline__ void advance() {
    in_page += kStep;
    if (in_page >= page_size) {
      const int pages = page_size >= kStep ? 1 : in_page / page_size;
      entry += pages;
      in_page -= pages * page_size;
    }
  }
};

}  // namespace attn
}  // namespace cuflash
