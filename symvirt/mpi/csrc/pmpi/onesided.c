/* ---- one-sided communication: windows are observed, not their operations -----------------
 * Creating and freeing a window and MPI_Win_fence are collective, so aligned like other
 * collectives (a rank never waits in one for a peer that is in a cut); while a window is alive
 * this rank refuses cuts (see svp_cut). */
#include "pmpi_internal.h"

/* Where win is in the list, -1 if the layer did not see it made. */
static int window_index(MPI_Win win)
{
    for (int i = 0; i < svp.windows.n; i++)
        if (svp.windows.v[i].win == win)
            return i;
    return -1;
}

/* The slot a known window's collectives align on. */
static int window_slot(int index)
{
    return svp_slot_holding(svp.windows.v[index].cid, svp.windows.v[index].comm);
}

/* Aligns on the window's communicator, runs c, and remembers the window it made. */
static int make_window(coll *c)
{
    c->cid = svp_cid(c->comm);
    int rc = svp_align(c->cid, c);
    if (rc == MPI_SUCCESS && *c->win != MPI_WIN_NULL && svp.ready && !svp.closed) {
        GROW(svp.windows);
        svp.windows.v[svp.windows.n++] = (window){*c->win, c->cid, c->comm};
    }
    return rc;
}

/* The constructors with a displacement unit, in their int form (I) and in MPI 4's
 * large-count one (L: an MPI_Aint unit, kept in disp_unit_c; MPICH 4). */
#define DISP_UNIT_I int
#define DISP_UNIT_L MPI_Aint
#define FIELD_I disp_unit
#define FIELD_L disp_unit_c
#define WINDOW_CONSTRUCTORS(K, sfx)                                                            \
    RUN(run_win_create##sfx, PMPI_Win_create##sfx(c->base, c->size, c->FIELD_##K, c->info,    \
                                                  c->comm, c->win))                            \
    RUN(run_win_allocate##sfx, PMPI_Win_allocate##sfx(c->size, c->FIELD_##K, c->info,         \
                                                      c->comm, c->baseptr, c->win))            \
    RUN(run_win_allocate_shared##sfx,                                                          \
        PMPI_Win_allocate_shared##sfx(c->size, c->FIELD_##K, c->info, c->comm, c->baseptr,     \
                                      c->win))                                                 \
    int MPI_Win_create##sfx(void *base, MPI_Aint size, DISP_UNIT_##K disp_unit, MPI_Info info, \
                            MPI_Comm comm, MPI_Win *win)                                       \
    {                                                                                          \
        GUARD();                                                                               \
        coll c = {.run = run_win_create##sfx, .comm = comm, .base = base, .size = size,        \
                  .FIELD_##K = disp_unit, .info = info, .win = win};                           \
        return make_window(&c);                                                                \
    }                                                                                          \
    int MPI_Win_allocate##sfx(MPI_Aint size, DISP_UNIT_##K disp_unit, MPI_Info info,           \
                              MPI_Comm comm, void *baseptr, MPI_Win *win)                      \
    {                                                                                          \
        GUARD();                                                                               \
        coll c = {.run = run_win_allocate##sfx, .comm = comm, .size = size,                    \
                  .FIELD_##K = disp_unit, .info = info, .baseptr = baseptr, .win = win};       \
        return make_window(&c);                                                                \
    }                                                                                          \
    int MPI_Win_allocate_shared##sfx(MPI_Aint size, DISP_UNIT_##K disp_unit, MPI_Info info,    \
                                     MPI_Comm comm, void *baseptr, MPI_Win *win)               \
    {                                                                                          \
        GUARD();                                                                               \
        coll c = {.run = run_win_allocate_shared##sfx, .comm = comm, .size = size,             \
                  .FIELD_##K = disp_unit, .info = info, .baseptr = baseptr, .win = win};       \
        return make_window(&c);                                                                \
    }

WINDOW_CONSTRUCTORS(I, )
#if MPI_VERSION >= 4
WINDOW_CONSTRUCTORS(L, _c)
#endif

RUN(run_win_create_dynamic, PMPI_Win_create_dynamic(c->info, c->comm, c->win))
RUN(run_win_free, PMPI_Win_free(c->win))
RUN(run_win_fence, PMPI_Win_fence(c->assert_, *c->win))

int MPI_Win_create_dynamic(MPI_Info info, MPI_Comm comm, MPI_Win *win)
{
    GUARD();
    coll c = {.run = run_win_create_dynamic, .comm = comm, .info = info, .win = win};
    return make_window(&c);
}


int MPI_Win_free(MPI_Win *win)
{
    GUARD();
    MPI_Win freed = *win;
    int i = window_index(freed);
    if (i < 0)
        return PMPI_Win_free(win);
    coll c = {.run = run_win_free, .win = win, .cid = window_slot(i)};
    int rc = svp_align(c.cid, &c); /* a cut meanwhile still sees the window open */
    i = window_index(freed);
    if (rc == MPI_SUCCESS && i >= 0)
        svp.windows.v[i] = svp.windows.v[--svp.windows.n];
    return rc;
}

int MPI_Win_fence(int assert_, MPI_Win win)
{
    GUARD();
    int i = window_index(win);
    coll c = {.run = run_win_fence, .win = &win, .assert_ = assert_,
              .cid = i < 0 ? -1 : window_slot(i)};
    return svp_align(c.cid, &c);
}
