/* ---- init and finalize ------------------------------------------------------------------ */
#include "pmpi_internal.h"

static void setup(void)
{
    PMPI_Comm_rank(MPI_COMM_WORLD, &svp.me);
    PMPI_Comm_size(MPI_COMM_WORLD, &svp.np);
    /* The private communicators span MPI_COMM_WORLD. Made with MPI_Comm_create_group, not
     * MPI_Comm_dup: Open MPI's dup agrees on the new context with a non-blocking allreduce on
     * MPI_COMM_WORLD, which hooks its non-blocking collective engine into every later
     * progress turn of the application (about 20 instructions each); create_group agrees
     * point to point. Its tag cannot meet the application's messages: none exist yet. */
    MPI_Group world;
    PMPI_Comm_group(MPI_COMM_WORLD, &world);
    PMPI_Comm_create_group(MPI_COMM_WORLD, world, 1, &svp.ctl);
    PMPI_Comm_create_group(MPI_COMM_WORLD, world, 2, &svp.align);
    PMPI_Group_free(&world);
    PMPI_Comm_dup(MPI_COMM_SELF, &svp.self);
    PMPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, svp_on_comm_delete, &svp.keyval, NULL);
    svp_blocking.req = MPI_REQUEST_NULL;
    svp.sent = calloc((size_t)svp.np, sizeof(uint64_t));
    svp.recv = calloc((size_t)svp.np, sizeof(uint64_t));
    if (svp.sent == NULL || svp.recv == NULL)
        svp_die("out of memory");
    svp_cut_setup();
    if (svp_track_comm(MPI_COMM_WORLD) != 0)
        svp_die("cannot track MPI_COMM_WORLD");
    svp.comms[0].id = 1;
    svp_agreement_setup();
    int rc = symvirt_ctl_open((uint32_t)svp.me, NULL,
                              symvirt_env_ms("SYMVIRT_CONNECT_TIMEOUT_MS", 10000));
    if (rc != SYMVIRT_CONTINUE)
        fprintf(stderr, "symvirt-pmpi rank %d: no guest agent (%s): the job cannot be migrated%s\n",
                svp.me, symvirt_last_error(),
                symvirt_ctl_signal_cuts() ? "; SIGUSR1 through the launcher still takes cuts"
                                          : " or cut");
    svp.ready = 1;
}

int MPI_Init(int *argc, char ***argv)
{
    int rc = PMPI_Init(argc, argv);
    if (rc == MPI_SUCCESS)
        setup();
    return rc;
}

int MPI_Init_thread(int *argc, char ***argv, int required, int *provided)
{
    int rc = PMPI_Init_thread(argc, argv, required, provided);
    if (rc == MPI_SUCCESS)
        setup();
    return rc;
}

int MPI_Finalize(void)
{
    if (svp.ready && !svp.closed) {
        svp_align(0, NULL);
#ifdef SYMVIRT_MPI_IMPL_MPICH
        svp_free_spent();
#endif
        /* From here no rank serves cuts: a request now fails the epoch at the agent. */
        svp.closed = 1;
        symvirt_ctl_close();
        PMPI_Comm_free(&svp.ctl);
        PMPI_Comm_free(&svp.align);
        PMPI_Comm_free(&svp.self);
    }
    return PMPI_Finalize();
}
