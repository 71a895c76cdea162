//! Blowfish half-rounds 1..=15 of 4 or 5 lanes in inline assembly
//! (baseline x86-64: no BMI, no SIMD), for [`super::Tables::ctr_blocks`].
//!
//! Why assembly: the same schedule written in Rust (any lane count from 4
//! to 8, any way of spelling the byte extraction) runs at 440-480 MiB/s,
//! because LLVM's register allocator needs the high-byte registers
//! (`ah`..`dh`, only in `rax`..`rdx`) for the byte extraction and pays
//! for them with copies and spills of the lanes' halves. Here all 10
//! halves of 5 lanes live in registers for the whole block, and one half-
//! round costs 12 instructions per lane, 10 of them ALU ops (Blowfish's
//! floor on baseline x86-64: 4 byte extractions need at least one shift
//! beyond the 4 `movzx`, then add, xor, add, the xor into the other half
//! and the P xor). Measured on the 2-core Zen 4 dev VM, keystream xor'd
//! into 1400 bytes: 5 lanes 569 MiB/s, 4 lanes 494 (a 4-lane group is
//! bound by one lane's ~11-cycle dependency chain per half-round), against
//! 464 for the Rust 8 lanes it replaces in the same run; see
//! [`super::LANES`]. A Rust version of this exact extraction (`x >> 8`,
//! then its bytes) stayed at 440-475 with 4, 5, 6 or 8 lanes.

use super::Tables;

// The asm addresses S-box `i` at byte `1024 * i` of `Tables` and P at
// `P_OFFSET`.
const _: () = assert!(core::mem::offset_of!(Tables, s) == 0);
const P_OFFSET: usize = core::mem::offset_of!(Tables, p);

/// One half-round of one lane: `y ^= P[k + 1]; y ^= F(x)`, `$p` being
/// `4 * (k + 1)`, the byte offset of `P[k + 1]` in P.
///
/// With `x` = bytes a b c d (a most significant), `t = x >> 8` puts b in
/// `t`'s high byte register and c in its low byte, and `t >> 16` is a.
/// `t` and `u` are in `reg_abcd` because only `rax`..`rdx` have a
/// high-byte register, and `movzx` from one cannot take a REX prefix, so
/// its destination `u` must not be `r8`..`r15` either. The result
/// accumulates in `t` (its index is dead once S0 is loaded).
macro_rules! half_round {
    ($x:ident, $y:ident, $p:literal) => {
        concat!(
            "xor {", stringify!($y), ":e}, dword ptr [{s} + {P} + ", $p, "]\n",
            "mov {t:e}, {", stringify!($x), ":e}\n",
            "shr {t:e}, 8\n",
            "movzx {u:e}, {t:h}\n",
            "movzx {v:e}, {t:l}\n",
            "shr {t:e}, 16\n",
            "mov {t:e}, dword ptr [{s} + {t:r}*4]\n",
            "add {t:e}, dword ptr [{s} + {u:r}*4 + 1024]\n",
            "xor {t:e}, dword ptr [{s} + {v:r}*4 + 2048]\n",
            "movzx {u:e}, {", stringify!($x), ":l}\n",
            "add {t:e}, dword ptr [{s} + {u:r}*4 + 3072]\n",
            "xor {", stringify!($y), ":e}, {t:e}\n",
        )
    };
}

/// Half-round k of every lane, lane after lane (the out-of-order core
/// overlaps them; register renaming gives each lane its own `t`, `u`,
/// `v`): odd k updates l from F(r), even k r from F(l).
macro_rules! all_lanes {
    (odd $p:literal; $($l:ident $r:ident),*) => { concat!($(half_round!($r, $l, $p)),*) };
    (even $p:literal; $($l:ident $r:ident),*) => { concat!($(half_round!($l, $r, $p)),*) };
}

macro_rules! half_rounds_1_to_15 {
    ($($l:ident $r:ident),*) => {
        concat!(
            all_lanes!(odd "8"; $($l $r),*),
            all_lanes!(even "12"; $($l $r),*),
            all_lanes!(odd "16"; $($l $r),*),
            all_lanes!(even "20"; $($l $r),*),
            all_lanes!(odd "24"; $($l $r),*),
            all_lanes!(even "28"; $($l $r),*),
            all_lanes!(odd "32"; $($l $r),*),
            all_lanes!(even "36"; $($l $r),*),
            all_lanes!(odd "40"; $($l $r),*),
            all_lanes!(even "44"; $($l $r),*),
            all_lanes!(odd "48"; $($l $r),*),
            all_lanes!(even "52"; $($l $r),*),
            all_lanes!(odd "56"; $($l $r),*),
            all_lanes!(even "60"; $($l $r),*),
            all_lanes!(odd "64"; $($l $r),*),
        )
    };
}

/// Defines `$name`: half-rounds k = 1..=15 (`y ^= P[k + 1]; y ^= F(x)`,
/// (x, y) = (r, l) for odd k, (l, r) for even k) of `$n` lanes; P[16]
/// ends up in l. With 5 lanes, the 10 halves, the table pointer and the 3
/// temporaries take 14 of the 15 usable registers.
macro_rules! half_rounds_fn {
    ($name:ident, $n:literal, $($i:literal $l:ident $r:ident),*) => {
        #[inline(always)]
        pub(super) fn $name(t: &Tables, l: &mut [u32; $n], r: &mut [u32; $n]) {
            // SAFETY: the asm only reads `t` (S-box indices are bytes, so
            // every load is within its 1 KiB box; P offsets are at most
            // 64 < 72) and writes only its register operands; no stack use.
            unsafe {
                core::arch::asm!(
                    half_rounds_1_to_15!($($l $r),*),
                    s = in(reg) t,
                    P = const P_OFFSET,
                    t = out(reg_abcd) _,
                    u = out(reg_abcd) _,
                    v = out(reg) _,
                    $($l = inout(reg) l[$i], $r = inout(reg) r[$i],)*
                    options(pure, readonly, nostack),
                );
            }
        }
    };
}

half_rounds_fn!(half_rounds4, 4, 0 l0 r0, 1 l1 r1, 2 l2 r2, 3 l3 r3);
half_rounds_fn!(half_rounds5, 5, 0 l0 r0, 1 l1 r1, 2 l2 r2, 3 l3 r3, 4 l4 r4);
