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
  int page_size;
  long long token_stride;  // elements between consecutive tokens of one page: kv_heads * head_dim
  long long head_offset;   // elements from a token's start to this CTA's kv head: kv_head * head_dim

  // Element offset of key `key` (0-based in the sequence) of this kv head inside a pool. The page id
  // comes from the table (L1-resident after the first tile), the slot from the remainder.
  __device__ __forceinline__ long long offset(int key) const {
    const int page = __ldg(table + key / page_size);
    const int slot = key - (key / page_size) * page_size;
    return (static_cast<long long>(page) * page_size + slot) * token_stride + head_offset;
  }
};

}  // namespace attn
}  // namespace cuflash
