// Included (not #pragma once) where a file's arithmetic must not be contracted: GCC fuses a·b + c
// into one FMA by default in C++ wherever the target has one (the AVX-512 clones), which rounds once
// instead of twice and breaks a bit-exact match with the reference. Only the code between this and
// fp_contract_off_end.h is affected: include the torch headers before it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif
