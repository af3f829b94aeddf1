! SymVirt Fortran stress program: the Fortran bindings' point-to-point and collectives with
! checked payloads (same contract as stress.c).
!
!   stress_f DIR MIN_ITERS
!
! Every iteration: a blocking ring (even ranks send first), a non-blocking ring (Irecv, Isend,
! Waitall), ANY_SOURCE receives on a duplicated communicator, a ring and an Allreduce on each
! half of an MPI_Comm_split, persistent requests (Recv_init, Send_init, Startall, Waitall,
! Request_free), a matched probe (Mprobe + Mrecv), Sendrecv_replace, Iallreduce + Ibarrier,
! an Ibcast through a derived datatype rank 0 frees before the others have called theirs,
! Allreduce + Bcast; then MPI-3 calls: Ialltoall, Ialltoallw, Iallgather on the shared-memory
! node (Comm_split_type; the tests run every rank on one machine), Ireduce on a row of a 2-D
! cartesian grid (Cart_sub), Iscan, Ineighbor_allgather and Ineighbor_alltoallw on a periodic
! 1-D cartesian ring and an MPI_Comm_idup (every 4 iterations; the previous one freed, or
! every 8 disconnected), all outstanding together; a
! ring on the idup'd communicator (its receive polled with Request_get_status), on the row and
! on the node; Exscan and Neighbor_alltoall. The MPI-3 communicators are remade every 8
! iterations, after the first iteration's traffic (so cuts land in their creation too). Then
! MPI-IO on a file open for the whole run (DIR/io_f.dat): the rank's block written with
! mpi_file_write_at_all (every 4th iteration through mpi_file_set_view and
! mpi_file_write_all), sync, barrier, sync, the right neighbour's block read back with
! mpi_file_read_at_all and checked. Every message carries (source, destination, per-pair sequence
! number) and a derived payload that the receiver checks; every collective result is checked.
! Runs at least MIN_ITERS iterations, then until DIR/stop exists.
! Built with -DSYMVIRT_EXPLICIT it calls symvirt_safe_point_f every iteration, then computes for
! 20 ms inside a quiet phase with a non-blocking ring outstanding across it
! (symvirt_quiet_begin_requests_f / symvirt_quiet_end_f, then Waitall and checks; MPI is
! initialised at MPI_THREAD_SINGLE, so cuts are made at the phase's begin or end), and
! registers a quiesce hook (bind(c)) that writes DIR/cut-E-R ("iteration sent received", the
! ring's receive counted once its message is in the buffer); after a resume it writes
! DIR/resumed-E-R.
module stress_state
  use iso_c_binding
  implicit none
  integer, parameter :: small = 4, large = 32768
  integer :: me, np
  integer(8) :: sent = 0, received = 0, iteration = 0, cuts = 0
  character(len=1024) :: dir
  integer(8), allocatable :: seq_to(:), seq_from(:)
  ! The receive outstanding across the quiet phase: its buffer, sender, and whether it is.
  integer(8), allocatable, asynchronous :: qbuf(:)
  integer :: q_from = -1
  logical :: q_pending = .false.
contains
  integer(8) function word(src, dst, seq, i)
    integer, intent(in) :: src, dst, i
    integer(8), intent(in) :: seq
    word = int(src, 8) * 1000003_8 + int(dst, 8) * 10007_8 + seq * 101_8 + int(i, 8)
  end function

  integer function len_for(seq)
    integer(8), intent(in) :: seq
    if (mod(seq, 7_8) == 3_8) then
      len_for = large + 3
    else
      len_for = small + 3
    end if
  end function

  subroutine fill(buf, dst, n)
    integer(8), intent(out) :: buf(:)
    integer, intent(in) :: dst
    integer, intent(out) :: n
    integer :: i
    integer(8) :: seq
    seq = seq_to(dst)
    seq_to(dst) = seq + 1
    n = len_for(seq)
    buf(1) = me
    buf(2) = dst
    buf(3) = seq
    do i = 4, n
      buf(i) = word(me, dst, seq, i)
    end do
    sent = sent + 1
  end subroutine

  ! A message of the full buffer's length (for calls whose count both sides fix in advance).
  subroutine fill_full(buf, dst)
    integer(8), intent(out) :: buf(:)
    integer, intent(in) :: dst
    integer :: i
    integer(8) :: seq
    seq = seq_to(dst)
    seq_to(dst) = seq + 1
    buf(1) = me
    buf(2) = dst
    buf(3) = seq
    do i = 4, large + 3
      buf(i) = word(me, dst, seq, i)
    end do
    sent = sent + 1
  end subroutine

  ! full: the message was made by fill_full (its length does not follow len_for).
  subroutine check(buf, src, count, full)
    use mpi
    integer(8), intent(in) :: buf(:)
    integer, intent(in) :: src, count
    logical, intent(in), optional :: full
    integer :: i, ierr
    integer(8) :: seq
    seq = buf(3)
    if (buf(1) /= src .or. buf(2) /= me) call fail('bad header', src)
    if (seq /= seq_from(src)) call fail('lost, duplicated or reordered message', src)
    seq_from(src) = seq + 1
    if (present(full)) then
      if (count /= large + 3) call fail('bad length', src)
    else if (count /= len_for(seq)) then
      call fail('bad length', src)
    end if
    do i = 4, count
      if (buf(i) /= word(src, me, seq, i)) call fail('corrupted payload', src)
    end do
    received = received + 1
    ierr = 0
  end subroutine

  ! A ring on comm, whose rank r (of size) is WORLD rank base + r: send right, receive left.
  subroutine ring_on(comm, r, size, base, tag, sbuf, rbuf)
    use mpi
    integer, intent(in) :: comm, r, size, base, tag
    integer(8), intent(inout) :: sbuf(:), rbuf(:)
    integer :: n, count, req, ierr, status(MPI_STATUS_SIZE)
    if (size < 2) return
    call fill(sbuf, base + mod(r + 1, size), n)
    call mpi_isend(sbuf, n, MPI_INTEGER8, mod(r + 1, size), tag, comm, req, ierr)
    call mpi_recv(rbuf, large + 3, MPI_INTEGER8, mod(r + size - 1, size), tag, comm, status, &
      ierr)
    call mpi_get_count(status, MPI_INTEGER8, count, ierr)
    call check(rbuf, base + status(MPI_SOURCE), count)
    call mpi_wait(req, MPI_STATUS_IGNORE, ierr)
  end subroutine

  subroutine fail(what, peer)
    use mpi
    character(len=*), intent(in) :: what
    integer, intent(in) :: peer
    integer :: ierr
    write (0, '(a,i0,a,i0,a,a,a,i0,a)') 'stress_f FAIL rank ', me, ' iteration ', iteration, &
      ': ', what, ' (peer ', peer, ')'
    call mpi_abort(MPI_COMM_WORLD, 3, ierr)
  end subroutine

  ! Whether qbuf holds the message expected next from q_from, payload intact.
  logical function q_arrived()
    integer :: i, n
    integer(8) :: seq
    seq = seq_from(q_from)
    n = len_for(seq)
    q_arrived = qbuf(1) == q_from .and. qbuf(2) == me .and. qbuf(3) == seq
    do i = 4, n
      if (.not. q_arrived) exit
      q_arrived = qbuf(i) == word(q_from, me, seq, i)
    end do
  end function

  subroutine at_cut(epoch, ctx) bind(c)
    integer(c_int64_t), value :: epoch
    type(c_ptr), value :: ctx
    character(len=1100) :: path
    integer(8) :: got
    got = received
    if (q_pending) then
      if (q_arrived()) got = got + 1
    end if
    write (path, '(a,a,i0,a,i0)') trim(dir), '/cut-', epoch, '-', me
    open (unit=21, file=trim(path), status='replace', action='write')
    write (21, '(i0,1x,i0,1x,i0)') iteration, sent, got
    close (21)
  end subroutine
end module

program stress_f
  use mpi
  use stress_state
  implicit none
#ifdef SYMVIRT_EXPLICIT
  interface
    integer(c_int) function symvirt_on_quiesce(hook, ctx) bind(c, name='symvirt_on_quiesce')
      import :: c_int, c_funptr, c_ptr
      type(c_funptr), value :: hook
      type(c_ptr), value :: ctx
    end function
  end interface
  integer :: result, rc
  integer(8) :: epoch, t0, t, rate
#endif
  integer :: ierr, right, left, n, m, count, any_comm, root, p, mine, all
  integer :: half_comm, hr, hsize, base, pcomm, preq(2), msg
  integer :: node_comm, nr, nsz, cart2, row_comm, rr, rsz, rbase, ring_comm, dup_comm, new_dup, q
  integer :: dims(2), nbreq(8), scan_in, scanned, ones(2), ntypes(2)
  integer(kind=MPI_ADDRESS_KIND) :: ndispls(2)
  logical :: periods(2), remain(2), flag
  integer(8) :: gval, red, expected, nb_g(2), nb_s(2), nb_r(2), nb_ws(2), nb_wr(2)
  integer(8), allocatable :: a2a_s(:), a2a_r(:), w_s(:), w_r(:), gath(:)
  integer, allocatable :: wcounts(:), wdispls(:), wtypes(:)
  integer :: status(MPI_STATUS_SIZE), statuses(MPI_STATUS_SIZE, 2), req(2)
  integer(8), allocatable :: sbuf(:), rbuf(:), many(:, :)
  integer, allocatable :: mreq(:)
  integer(8) :: v(16), r(16), min_iters, tot(2), gtot(2)
  integer(8), asynchronous :: bv(16)
  integer :: blk, tok
  character(len=32) :: arg
  logical :: stop_file
  integer :: io_fh
  integer(kind=MPI_OFFSET_KIND) :: io_at, io_bytes
  integer(8) :: io_block(1024), io_back(1024)

  call mpi_init(ierr)
  call mpi_comm_rank(MPI_COMM_WORLD, me, ierr)
  call mpi_comm_size(MPI_COMM_WORLD, np, ierr)
  call get_command_argument(1, dir)
  call get_command_argument(2, arg)
  read (arg, *) min_iters
  allocate (seq_to(0:np - 1), seq_from(0:np - 1), sbuf(large + 3), rbuf(large + 3))
  allocate (many(large + 3, 0:np - 1), mreq(0:np - 1), qbuf(large + 3))
  seq_to = 0
  seq_from = 0
  call mpi_comm_dup(MPI_COMM_WORLD, any_comm, ierr)
  call mpi_comm_dup(MPI_COMM_WORLD, pcomm, ierr)
  call mpi_file_open(MPI_COMM_WORLD, trim(dir)//'/io_f.dat', MPI_MODE_CREATE + MPI_MODE_RDWR, &
                     MPI_INFO_NULL, io_fh, ierr)
  if (ierr /= MPI_SUCCESS) call fail('mpi_file_open', -1)
  io_bytes = 8 * size(io_block)
  ! two halves, ranks in WORLD order: WORLD rank = base + rank in the half
  call mpi_comm_split(MPI_COMM_WORLD, merge(1, 0, me < np / 2), me, half_comm, ierr)
  call mpi_comm_rank(half_comm, hr, ierr)
  call mpi_comm_size(half_comm, hsize, ierr)
  base = me - hr
  right = mod(me + 1, np)
  left = mod(me + np - 1, np)
  allocate (a2a_s(0:np - 1), a2a_r(0:np - 1), w_s(0:np - 1), w_r(0:np - 1), gath(0:np - 1))
  allocate (wcounts(0:np - 1), wdispls(0:np - 1), wtypes(0:np - 1))
  wcounts = 1
  wdispls = [(8 * q, q = 0, np - 1)]
  wtypes = MPI_INTEGER8
  ones = 1
  ndispls = [0_MPI_ADDRESS_KIND, 8_MPI_ADDRESS_KIND]
  ntypes = MPI_INTEGER8
#ifdef SYMVIRT_EXPLICIT
  call symvirt_init_f(MPI_COMM_WORLD, rc)
  if (rc /= 0) call fail('symvirt_init_f', rc)
  rc = symvirt_on_quiesce(c_funloc(at_cut), c_null_ptr)
#endif

  do
    ! blocking ring
    if (mod(me, 2) == 0) then
      call fill(sbuf, right, n)
      call mpi_send(sbuf, n, MPI_INTEGER8, right, 10, MPI_COMM_WORLD, ierr)
      call mpi_recv(rbuf, large + 3, MPI_INTEGER8, left, 10, MPI_COMM_WORLD, status, ierr)
      call mpi_get_count(status, MPI_INTEGER8, count, ierr)
      call check(rbuf, left, count)
    else
      call mpi_recv(rbuf, large + 3, MPI_INTEGER8, left, 10, MPI_COMM_WORLD, status, ierr)
      call mpi_get_count(status, MPI_INTEGER8, count, ierr)
      call check(rbuf, left, count)
      call fill(sbuf, right, n)
      call mpi_send(sbuf, n, MPI_INTEGER8, right, 10, MPI_COMM_WORLD, ierr)
    end if
    ! non-blocking ring
    call mpi_irecv(rbuf, large + 3, MPI_INTEGER8, left, 11, MPI_COMM_WORLD, req(1), ierr)
    call fill(sbuf, right, n)
    call mpi_isend(sbuf, n, MPI_INTEGER8, right, 11, MPI_COMM_WORLD, req(2), ierr)
    call mpi_waitall(2, req, statuses, ierr)
    call mpi_get_count(statuses(:, 1), MPI_INTEGER8, count, ierr)
    call check(rbuf, left, count)
    ! ANY_SOURCE on its own communicator
    do p = 0, np - 1
      if (p /= me) then
        call fill(many(:, p), p, n)
        call mpi_isend(many(:, p), n, MPI_INTEGER8, p, 20, any_comm, mreq(p), ierr)
      else
        mreq(p) = MPI_REQUEST_NULL
      end if
    end do
    do m = 1, np - 1
      call mpi_recv(rbuf, large + 3, MPI_INTEGER8, MPI_ANY_SOURCE, 20, any_comm, status, ierr)
      call mpi_get_count(status, MPI_INTEGER8, count, ierr)
      call check(rbuf, status(MPI_SOURCE), count)
    end do
    call mpi_waitall(np, mreq, MPI_STATUSES_IGNORE, ierr)
    ! a ring on each half of an MPI_Comm_split, then an Allreduce on the half
    call ring_on(half_comm, hr, hsize, base, 30, sbuf, rbuf)
    mine = me + 1
    call mpi_allreduce(mine, all, 1, MPI_INTEGER, MPI_SUM, half_comm, ierr)
    if (all /= hsize * (base + 1) + hsize * (hsize - 1) / 2) call fail('Allreduce on a half', -1)
    ! persistent requests (made, started, completed and freed every iteration)
    call fill(sbuf, right, n)
    call mpi_recv_init(rbuf, large + 3, MPI_INTEGER8, left, 31, pcomm, preq(1), ierr)
    call mpi_send_init(sbuf, n, MPI_INTEGER8, right, 31, pcomm, preq(2), ierr)
    call mpi_startall(2, preq, ierr)
    call mpi_waitall(2, preq, statuses, ierr)
    call mpi_get_count(statuses(:, 1), MPI_INTEGER8, count, ierr)
    call check(rbuf, left, count)
    call mpi_request_free(preq(1), ierr)
    call mpi_request_free(preq(2), ierr)
    ! matched probe
    call fill(sbuf, right, n)
    call mpi_isend(sbuf, n, MPI_INTEGER8, right, 32, pcomm, req(2), ierr)
    call mpi_mprobe(left, 32, pcomm, msg, status, ierr)
    call mpi_get_count(status, MPI_INTEGER8, count, ierr)
    call mpi_mrecv(rbuf, count, MPI_INTEGER8, msg, status, ierr)
    call check(rbuf, status(MPI_SOURCE), count)
    call mpi_wait(req(2), MPI_STATUS_IGNORE, ierr)
    ! Sendrecv_replace around the ring; non-blocking collectives completed together
    call fill_full(sbuf, right)
    call mpi_sendrecv_replace(sbuf, large + 3, MPI_INTEGER8, right, 33, left, 33, pcomm, &
      status, ierr)
    call mpi_get_count(status, MPI_INTEGER8, count, ierr)
    call check(sbuf, left, count, .true.)
    mine = me + 1
    call mpi_iallreduce(mine, all, 1, MPI_INTEGER, MPI_SUM, half_comm, req(1), ierr)
    call mpi_ibarrier(MPI_COMM_WORLD, req(2), ierr)
    call mpi_waitall(2, req, statuses, ierr)
    if (all /= hsize * (base + 1) + hsize * (hsize - 1) / 2) call fail('Iallreduce on a half', -1)
    ! an Ibcast through a derived datatype that rank 0 frees before the others have called
    ! theirs (it lets them go on only then): its Ibcast cannot have started at the free
    if (me /= 0) call mpi_recv(tok, 0, MPI_INTEGER, 0, 34, MPI_COMM_WORLD, MPI_STATUS_IGNORE, ierr)
    call mpi_type_contiguous(16, MPI_INTEGER8, blk, ierr)
    call mpi_type_commit(blk, ierr)
    if (me == 0) then
      bv = [(iteration * 5_8 + int(n, 8), n = 1, 16)]
    else
      bv = 0
    end if
    call mpi_ibcast(bv, 1, blk, 0, MPI_COMM_WORLD, req(1), ierr)
    call mpi_type_free(blk, ierr)
    if (blk /= MPI_DATATYPE_NULL) call fail('a freed datatype is not null', -1)
    if (me == 0) then
      do p = 1, np - 1
        call mpi_send(tok, 0, MPI_INTEGER, p, 34, MPI_COMM_WORLD, ierr)
      end do
    end if
    call mpi_wait(req(1), MPI_STATUS_IGNORE, ierr)
    do n = 1, 16
      if (bv(n) /= iteration * 5_8 + int(n, 8)) call fail('Ibcast through a freed datatype', 0)
    end do
    ! collectives
    v = [(int(me, 8) * 100_8 + int(n, 8) + iteration, n = 1, 16)]
    call mpi_allreduce(v, r, 16, MPI_INTEGER8, MPI_SUM, MPI_COMM_WORLD, ierr)
    do n = 1, 16
      if (r(n) /= int(np, 8) * (int(n, 8) + iteration) + 100_8 * int(np * (np - 1) / 2, 8)) &
        call fail('Allreduce result', -1)
    end do
    root = int(mod(iteration, int(np, 8)))
    if (me == root) then
      v = [(iteration * 7_8 + int(n, 8), n = 1, 16)]
    else
      v = 0
    end if
    call mpi_bcast(v, 16, MPI_INTEGER8, root, MPI_COMM_WORLD, ierr)
    do n = 1, 16
      if (v(n) /= iteration * 7_8 + int(n, 8)) call fail('Bcast result', root)
    end do
    ! MPI-3 non-blocking collectives and (every 4 iterations) an MPI_Comm_idup, outstanding
    ! together
    if (mod(iteration, 8_8) == 0) call make_mpi3_comms()
    do p = 0, np - 1
      a2a_s(p) = word(me, p, iteration, 1)
      w_s(p) = word(me, p, iteration, 2)
    end do
    gval = int(me, 8) * 3_8 + iteration
    scan_in = me + 1
    nb_ws = [word(me, left, iteration, 3), word(me, right, iteration, 4)]
    call mpi_ialltoall(a2a_s, 1, MPI_INTEGER8, a2a_r, 1, MPI_INTEGER8, MPI_COMM_WORLD, &
      nbreq(1), ierr)
    call mpi_ialltoallw(w_s, wcounts, wdispls, wtypes, w_r, wcounts, wdispls, wtypes, &
      MPI_COMM_WORLD, nbreq(2), ierr)
    call mpi_iallgather(gval, 1, MPI_INTEGER8, gath, 1, MPI_INTEGER8, node_comm, nbreq(3), ierr)
    call mpi_ireduce(gval, red, 1, MPI_INTEGER8, MPI_SUM, 0, row_comm, nbreq(4), ierr)
    call mpi_iscan(scan_in, scanned, 1, MPI_INTEGER, MPI_SUM, MPI_COMM_WORLD, nbreq(5), ierr)
    nbreq(6) = MPI_REQUEST_NULL
    if (mod(iteration, 4_8) == 0) call mpi_comm_idup(MPI_COMM_WORLD, new_dup, nbreq(6), ierr)
    call mpi_ineighbor_allgather(gval, 1, MPI_INTEGER8, nb_g, 1, MPI_INTEGER8, ring_comm, &
      nbreq(7), ierr)
    call mpi_ineighbor_alltoallw(nb_ws, ones, ndispls, ntypes, nb_wr, ones, ndispls, ntypes, &
      ring_comm, nbreq(8), ierr)
    call mpi_waitall(8, nbreq, MPI_STATUSES_IGNORE, ierr)
    do p = 0, np - 1
      if (a2a_r(p) /= word(p, me, iteration, 1)) call fail('Ialltoall result', p)
      if (w_r(p) /= word(p, me, iteration, 2)) call fail('Ialltoallw result', p)
      if (gath(p) /= int(p, 8) * 3_8 + iteration) call fail('Iallgather result on the node', p)
    end do
    if (rr == 0) then
      expected = 0
      do p = rbase, rbase + rsz - 1
        expected = expected + int(p, 8) * 3_8 + iteration
      end do
      if (red /= expected) call fail('Ireduce result on a cartesian row', rbase)
    end if
    if (scanned /= (me + 1) * (me + 2) / 2) call fail('Iscan result', -1)
    if (nb_g(1) /= int(left, 8) * 3_8 + iteration) call fail('Ineighbor_allgather result', left)
    if (nb_g(2) /= int(right, 8) * 3_8 + iteration) call fail('Ineighbor_allgather result', right)
    if (nb_wr(1) /= word(left, me, iteration, 4)) call fail('Ineighbor_alltoallw result', left)
    if (nb_wr(2) /= word(right, me, iteration, 3)) call fail('Ineighbor_alltoallw result', right)
    if (mod(iteration, 4_8) == 0) then
      ! the old one freed, or every 8 iterations disconnected (collective, and it waits for
      ! the communicator's traffic)
      if (iteration > 0 .and. mod(iteration, 8_8) == 0) then
        call mpi_comm_disconnect(dup_comm, ierr)
      else if (iteration > 0) then
        call mpi_comm_free(dup_comm, ierr)
      end if
      dup_comm = new_dup
    end if
    ! point to point on the communicators those calls made (counted per WORLD peer at a cut):
    ! a ring on the idup'd one, its receive polled with Request_get_status, then on the row
    ! and on the node
    call mpi_irecv(rbuf, large + 3, MPI_INTEGER8, left, 40, dup_comm, req(1), ierr)
    call fill(sbuf, right, n)
    call mpi_isend(sbuf, n, MPI_INTEGER8, right, 40, dup_comm, req(2), ierr)
    flag = .false.
    do while (.not. flag)
      call mpi_request_get_status(req(1), flag, status, ierr)
    end do
    call mpi_get_count(status, MPI_INTEGER8, count, ierr)
    call check(rbuf, status(MPI_SOURCE), count)
    call mpi_waitall(2, req, MPI_STATUSES_IGNORE, ierr)
    call ring_on(row_comm, rr, rsz, rbase, 41, sbuf, rbuf)
    call ring_on(node_comm, nr, nsz, 0, 42, sbuf, rbuf)
    ! blocking MPI-3 collectives
    call mpi_exscan(scan_in, scanned, 1, MPI_INTEGER, MPI_SUM, MPI_COMM_WORLD, ierr)
    if (me > 0 .and. scanned /= me * (me + 1) / 2) call fail('Exscan result', -1)
    nb_s = [word(me, left, iteration, 5), word(me, right, iteration, 6)]
    call mpi_neighbor_alltoall(nb_s, 1, MPI_INTEGER8, nb_r, 1, MPI_INTEGER8, ring_comm, ierr)
    if (nb_r(1) /= word(left, me, iteration, 6)) call fail('Neighbor_alltoall result', left)
    if (nb_r(2) /= word(right, me, iteration, 5)) call fail('Neighbor_alltoall result', right)
    ! MPI-IO (see the top)
    io_block = [(word(me, me, iteration, q), q = 1, size(io_block))]
    if (mod(iteration, 4_8) == 3_8) then
      call mpi_file_set_view(io_fh, me * io_bytes, MPI_INTEGER8, MPI_INTEGER8, 'native', &
                             MPI_INFO_NULL, ierr)
      if (ierr == MPI_SUCCESS) &
        call mpi_file_write_all(io_fh, io_block, size(io_block), MPI_INTEGER8, status, ierr)
      if (ierr == MPI_SUCCESS) &
        call mpi_file_set_view(io_fh, 0_MPI_OFFSET_KIND, MPI_BYTE, MPI_BYTE, 'native', &
                               MPI_INFO_NULL, ierr)
    else
      io_at = me * io_bytes
      call mpi_file_write_at_all(io_fh, io_at, io_block, size(io_block), MPI_INTEGER8, &
                                 MPI_STATUS_IGNORE, ierr)
    end if
    if (ierr /= MPI_SUCCESS) call fail('MPI-IO write', -1)
    call mpi_file_sync(io_fh, ierr)
    call mpi_barrier(MPI_COMM_WORLD, ierr)
    call mpi_file_sync(io_fh, ierr)
    io_at = right * io_bytes
    call mpi_file_read_at_all(io_fh, io_at, io_back, size(io_back), MPI_INTEGER8, status, ierr)
    if (ierr /= MPI_SUCCESS) call fail('MPI-IO read', -1)
    do q = 1, size(io_back)
      if (io_back(q) /= word(right, right, iteration, q)) &
        call fail('MPI-IO read back another block than the neighbour wrote', right)
    end do
#ifdef SYMVIRT_EXPLICIT
    call symvirt_safe_point_f(MPI_COMM_WORLD, result, epoch, rc)
    if (rc /= 0) call fail('symvirt_safe_point_f', rc)
    call after_cut_point(result, epoch)
    ! every message of the iteration is matched but a ring's, declared outstanding across the
    ! quiet phase that follows
    call mpi_irecv(qbuf, large + 3, MPI_INTEGER8, left, 12, MPI_COMM_WORLD, req(1), ierr)
    call fill(sbuf, right, n)
    call mpi_isend(sbuf, n, MPI_INTEGER8, right, 12, MPI_COMM_WORLD, req(2), ierr)
    q_from = left
    q_pending = .true.
    call symvirt_quiet_begin_requests_f(MPI_COMM_WORLD, 2, req, rc)
    if (rc /= 0) call fail('symvirt_quiet_begin_requests_f', rc)
    call system_clock(t0, rate)
    t = t0
    do while (t - t0 < rate / 50)
      call system_clock(t)
    end do
    call symvirt_quiet_end_f(MPI_COMM_WORLD, result, epoch, rc)
    if (rc /= 0) call fail('symvirt_quiet_end_f', rc)
    q_pending = .false.
    call after_cut_point(result, epoch)
    call mpi_waitall(2, req, statuses, ierr)
    call mpi_get_count(statuses(:, 1), MPI_INTEGER8, count, ierr)
    call check(qbuf, left, count)
#endif
    if (iteration + 1 >= min_iters .and. mod(iteration, 8_8) == 7_8) then
      inquire (file=trim(dir)//'/stop', exist=stop_file)
      mine = 0
      if (me == 0 .and. stop_file) mine = 1
      call mpi_allreduce(mine, all, 1, MPI_INTEGER, MPI_MAX, MPI_COMM_WORLD, ierr)
      if (all /= 0) exit
    end if
    iteration = iteration + 1
  end do

  tot = [sent, received]
  call mpi_allreduce(tot, gtot, 2, MPI_INTEGER8, MPI_SUM, MPI_COMM_WORLD, ierr)
  if (gtot(1) /= gtot(2)) call fail('global sent /= received at the end', -1)
#ifdef SYMVIRT_EXPLICIT
  call symvirt_finalize_f(rc)
#endif
  call mpi_file_close(io_fh, ierr)
  if (ierr /= MPI_SUCCESS) call fail('mpi_file_close', -1)
  call mpi_comm_free(any_comm, ierr)
  call mpi_comm_free(pcomm, ierr)
  call mpi_comm_free(half_comm, ierr)
  call free_mpi3_comms()
  call mpi_comm_free(dup_comm, ierr)
  write (*, '(a,i0,a,i0,a,i0,a,i0,a,i0)') 'stress_f OK rank ', me, ' iterations ', iteration + 1, &
    ' sent ', sent, ' received ', received, ' cuts ', cuts
  call mpi_finalize(ierr)
contains
#ifdef SYMVIRT_EXPLICIT
  ! After a safe point or a quiet phase's end: counts a cut and records its outcome.
  subroutine after_cut_point(result, epoch)
    integer, intent(in) :: result
    integer(8), intent(in) :: epoch
    character(len=1100) :: path
    if (result == 0) return
    cuts = cuts + 1
    write (path, '(a,a,i0,a,i0)') trim(dir), '/resumed-', epoch, '-', me
    open (unit=22, file=trim(path), status='replace', action='write')
    if (result == 1) then
      write (22, '(a,1x,i0)') 'resumed', iteration
    else
      write (22, '(a,1x,i0)') 'aborted', iteration
    end if
    close (22)
  end subroutine
#endif

  ! The MPI-3 communicators, (re)made every few iterations so that cuts land in their
  ! creation too; the previous ones are freed.
  subroutine make_mpi3_comms()
    if (iteration > 0) call free_mpi3_comms()
    ! the shared-memory node (key: WORLD rank, so node ranks are WORLD ranks when every rank
    ! is on this machine), a row of a 2-D cartesian grid (row-major, not reordered: WORLD
    ! rank = rbase + rank in the row), a periodic 1-D cartesian ring
    call mpi_comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, me, MPI_INFO_NULL, node_comm, &
      ierr)
    call mpi_comm_rank(node_comm, nr, ierr)
    call mpi_comm_size(node_comm, nsz, ierr)
    if (nsz /= np .or. nr /= me) call fail('Comm_split_type: not every rank on this node', nsz)
    dims = 0
    call mpi_dims_create(np, 2, dims, ierr)
    periods = .false.
    call mpi_cart_create(MPI_COMM_WORLD, 2, dims, periods, .false., cart2, ierr)
    remain = [.false., .true.]
    call mpi_cart_sub(cart2, remain, row_comm, ierr)
    call mpi_comm_rank(row_comm, rr, ierr)
    call mpi_comm_size(row_comm, rsz, ierr)
    if (rsz /= dims(2) .or. rr /= mod(me, dims(2))) call fail('Cart_sub: not a row', rsz)
    rbase = me - rr
    call mpi_cart_create(MPI_COMM_WORLD, 1, [np], [.true.], .false., ring_comm, ierr)
  end subroutine

  subroutine free_mpi3_comms()
    call mpi_comm_free(node_comm, ierr)
    call mpi_comm_free(row_comm, ierr)
    call mpi_comm_free(cart2, ierr)
    call mpi_comm_free(ring_comm, ierr)
  end subroutine
end program
